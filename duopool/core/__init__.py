"""The scheduling core: pure decisions (no grpc, redis, torch or wall clock inside).

The live scheduler service and the offline simulator import the same modules from here.
"""
