"""duopool.router"""
