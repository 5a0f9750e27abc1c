"""What crosses the wire: tensor streams, tensor manifests, tasks and their protobuf forms."""
