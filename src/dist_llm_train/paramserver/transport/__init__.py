"""The parameter server's two transports, both over the same `paramserver.job.ParameterStore`.

- gRPC (`grpc_server`, `grpc_client`): streamed InitJob / Pull / Push plus a unary zero-copy push;
- ZMQ + msgpack (`zmq_server`, `zmq_client`): the same messages as maps with a binary payload frame;
- `wire`: the one mapping between those messages and `core` types (the typed `JobSpec` is parsed there);
- `client`: the `PSClient` interface and `connect(transport, address)`.
"""

__all__ = ["client", "grpc_client", "grpc_server", "wire", "zmq_client", "zmq_server"]
