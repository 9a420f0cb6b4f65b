"""duopool.scheduler"""
