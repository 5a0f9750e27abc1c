"""Values that cross the wire and their protobuf forms: tensor streams, tensor manifests, task
values and every task<->protobuf conversion.
"""
