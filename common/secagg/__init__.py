"""pf2lora.common.secagg: SecAgg+ secure aggregation (masks, Shamir shares, fixed point, signed
keys).
"""
