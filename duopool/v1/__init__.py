"""Generated from protos/duopool/v1 by scripts/gen_protos.py. Do not edit."""
