"""duopool.worker.engines"""
