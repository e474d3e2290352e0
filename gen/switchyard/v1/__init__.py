"""Generated gRPC and protobuf code for switchyard.v1 (make gen; never edit by hand)."""
