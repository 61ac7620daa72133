"""The ``dmm.v1.PolicyService`` servicer (grpc.aio): small handlers; the streams run on one
:class:`~dmm.server.dispatch.Dispatcher`, the unary calls read the store."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import grpc

from dmm.server.dispatch import Dispatcher
from dmm.server.metrics import ServerMetrics
from dmm.server.pool import ModelPool
from dmm.server.sessions import SessionTable
from dmm.server.status import Unreadable, lenient, refuse, store_status
from dmm.server.streams import ACT, VECTOR
from dmm.v1 import policy_pb2, policy_pb2_grpc

SERVICE_NAME = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name


def add_to_server(service: PolicyService, server: grpc.aio.Server, max_message_bytes: int) -> None:
    """Register ``service`` like the generated ``add_PolicyServiceServicer_to_server``, but with
    lenient request deserializers that enforce ``max_message_bytes``."""
    pb = policy_pb2

    def parse(message_type: type) -> Callable[[bytes], object]:
        return lenient(message_type, max_message_bytes)

    handlers = {
        "Act": grpc.stream_stream_rpc_method_handler(
            service.Act, parse(pb.ActRequest), pb.ActResponse.SerializeToString
        ),
        "ActVector": grpc.stream_stream_rpc_method_handler(
            service.ActVector, parse(pb.VectorRequest), pb.VectorResponse.SerializeToString
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            service.ListModels, parse(pb.ListModelsRequest), pb.ListModelsResponse.SerializeToString
        ),
        "Describe": grpc.unary_unary_rpc_method_handler(
            service.Describe, parse(pb.DescribeRequest), pb.DescribeResponse.SerializeToString
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class PolicyService(policy_pb2_grpc.PolicyServiceServicer):
    """The gRPC handlers: the streams go to ``streams``, the unary calls read its pool's store."""

    def __init__(self, streams: Dispatcher) -> None:
        self.streams = streams
        self.pool: ModelPool = streams.pool
        self.metrics: ServerMetrics = streams.metrics

    @property
    def sessions(self) -> SessionTable:
        return self.streams.sessions

    @property
    def shutting_down(self) -> bool:
        """Set at shutdown: new sessions are refused with UNAVAILABLE."""
        return self.streams.shutting_down

    @shutting_down.setter
    def shutting_down(self, value: bool) -> None:
        self.streams.shutting_down = value

    def end_all_sessions(self) -> int:
        """Shutdown: end every open session with UNAVAILABLE; returns how many were open."""
        return self.streams.end_all()

    def move_resumable_sessions(self) -> int:
        """Drain: tell the streams whose clients can resume elsewhere to move; returns how many."""
        return self.streams.move_resumable()

    async def Act(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        await self.streams.run(context, ACT)

    async def ActVector(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        await self.streams.run(context, VECTOR)

    async def ListModels(self, request, context: grpc.aio.ServicerContext) -> policy_pb2.ListModelsResponse:
        if isinstance(request, Unreadable):
            await refuse(self.metrics, context, request.code, request.details)
        store = self.pool.store

        def _list() -> list[policy_pb2.ModelVersions]:
            out = []
            for name in store.models():
                versions = store.versions(name)
                if versions:
                    out.append(policy_pb2.ModelVersions(name=name, versions=versions, latest=versions[-1]))
            return out

        try:
            models = await asyncio.get_running_loop().run_in_executor(None, _list)
        except Exception as err:
            await refuse(self.metrics, context, *store_status(err, store.root))
        return policy_pb2.ListModelsResponse(models=models)

    async def Describe(self, request, context: grpc.aio.ServicerContext) -> policy_pb2.DescribeResponse:
        if isinstance(request, Unreadable):
            await refuse(self.metrics, context, request.code, request.details)
        if not request.model:
            await refuse(
                self.metrics,
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "model is empty: name the model to describe",
            )
        try:
            policy = await self.pool.describe(
                request.model, request.version if request.HasField("version") else None
            )
            versions = await asyncio.get_running_loop().run_in_executor(
                None, self.pool.store.versions, request.model
            )
        except Exception as err:
            await refuse(self.metrics, context, *store_status(err, self.pool.store.root), request.model)
        return policy_pb2.DescribeResponse(
            model=policy.name,
            version=policy.version,
            state_dim=policy.config.state_dim,
            act_dim=policy.config.act_dim,
            config_json=json.dumps(policy.config.model_dump(), sort_keys=True),
            meta_json=json.dumps(policy.meta.model_dump(), sort_keys=True),
            metrics_json=json.dumps(policy.metrics, sort_keys=True),
            versions=versions,
        )
