"""duopool.worker"""
