"""How the training workers find each other: torch's process group, on loopback when they all are.

    LoopbackTorchConfig(backend="gloo")    Ray Train's TorchConfig, for TorchTrainer(torch_config=...)

Ray Train's torch backend rendezvouses through a TCPStore that rank 0 serves on
MASTER_PORT, and torch binds that store to every interface (IPv4 and IPv6), whatever
MASTER_ADDR says, with no authentication. When every worker of the group runs on a
127.0.0.1 node (a local cluster, or one node bound to loopback), nothing has to be
reached from outside: the group then rendezvouses through a FileStore (a file in a
temporary directory, no listener at all), and gloo and NCCL open their own sockets
on the loopback interface (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME). Any other group
gets Ray Train's own set-up unchanged: the store listens on MASTER_PORT on rank 0's
node, gloo and NCCL on ports of their own on each node, all of which belong behind
the cluster's firewall (docs/CLUSTER.md, "Several machines").
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import tempfile

import psutil
import ray
import ray.util
from ray.train.torch import TorchConfig
from ray.train.torch.config import (
    _set_torch_distributed_env_vars,
    _setup_torch_process_group,
    _TorchBackend,
)


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1 and IPv4-mapped loopback (::ffff:127.0.0.1)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def loopback_interface() -> str:
    """The name of the network interface holding 127.0.0.1 ("lo" on Linux, "lo0" on macOS)."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == "127.0.0.1" for a in addresses):
            return name
    return "lo"


def _use_interface(name: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = name
    os.environ["NCCL_SOCKET_IFNAME"] = name


class LoopbackTorchBackend(_TorchBackend):
    """Ray Train's torch backend, with a FileStore rendezvous for an all-loopback worker group."""

    def __init__(self):
        super().__init__()
        self.store_dir = None

    def on_start(self, worker_group, backend_config: "LoopbackTorchConfig"):
        addresses = worker_group.execute(ray.util.get_node_ip_address)
        if not all(is_loopback(a) for a in addresses):
            return super().on_start(worker_group, backend_config)
        self._remove_store()
        # On the driver's node, like every worker of an all-loopback group (one machine).
        self.store_dir = tempfile.mkdtemp(prefix="fcn-rendezvous-")
        interface = worker_group.execute_single(0, loopback_interface)
        worker_group.execute(_use_interface, name=interface)
        worker_group.execute(_set_torch_distributed_env_vars)
        url = f"file://{self.store_dir}/store"
        backend = backend_config.backend or "gloo"
        ray.get([worker_group.execute_single_async(i, _setup_torch_process_group, backend=backend,
                                                   world_rank=i, world_size=len(worker_group), init_method=url,
                                                   timeout_s=backend_config.timeout_s)
                 for i in range(len(worker_group))])

    def on_shutdown(self, worker_group, backend_config):
        try:
            super().on_shutdown(worker_group, backend_config)
        finally:
            self._remove_store()

    def _remove_store(self) -> None:
        if self.store_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)
            self.store_dir = None


class LoopbackTorchConfig(TorchConfig):
    """TorchConfig (backend named: "gloo" or "nccl") whose backend is LoopbackTorchBackend."""

    @property
    def backend_cls(self):
        return LoopbackTorchBackend
