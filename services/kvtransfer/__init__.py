"""duopool.kvtransfer"""
