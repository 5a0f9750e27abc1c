"""SecAgg+ secure aggregation as a library: masks, Shamir shares, fixed point, signed keys."""
