"""duopool: online/offline co-located LLM serving on a prefill/decode-disaggregated cluster."""

__version__ = "0.1.0"
