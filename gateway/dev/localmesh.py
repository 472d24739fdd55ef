"""Region files as a mesh of Redis servers on this machine, for the demo.

:func:`load_mesh` reads every region file of a directory and checks that they describe regions
whose Redis servers this machine can run: plain ``redis://127.0.0.1:PORT`` URLs, one port per
region, every peer a region of the directory at the port its file names. Problems are reported
like any config problem, naming the file and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

from invalgw.config import RegionConfig, load_config, to_toml
from invalgw.dev.errors import PortInUse
from invalgw.dev.localredis import port_in_use
from invalgw.errors import ConfigError
from invalgw.names import Names

LOCAL_HOSTS = ("127.0.0.1", "localhost")


@dataclass
class LocalRegion:
    source: Path
    """The region file as the user wrote it."""
    config: RegionConfig
    config_path: Path
    """The file to run the gateway with: ``source``, or a copy with the ports moved."""

    @property
    def name(self) -> str:
        return self.config.region

    @property
    def port(self) -> int:
        return urlsplit(self.config.redis.url).port or 6379

    @property
    def names(self) -> Names:
        return Names(self.config.streams.namespace, self.config.streams.local)

    def gateway_keys(self) -> list[str]:
        """Every key the region's gateway keeps in its Redis (streams, state, status)."""
        names = self.names
        keys = [names.local_stream, names.status, names.epoch, names.dead_letters, names.gaps]
        for peer in self.config.peers:
            keys += [names.link(peer.name), names.mirror(peer.name), names.mirror_state(peer.name)]
        return keys


def load_mesh(directory: Path, *, port_base: int | None, workdir: Path) -> list[LocalRegion]:
    """Every region file in ``directory``, in port order, checked to run on this machine.

    With ``port_base``, Redis moves to ports ``port_base``, ``port_base + 1``, … and the metrics
    endpoints to the ports right after those; the moved configs are written to
    ``workdir/regions``.
    """
    files = sorted(directory.glob("*.toml"))
    if not files:
        raise ConfigError(
            str(directory),
            ["no region files (*.toml): run from the repository root, or pass --regions DIR"],
        )
    regions = [LocalRegion(path, load_config(path), config_path=path) for path in files]
    _check_mesh(regions)
    regions.sort(key=lambda region: (region.port, region.name))
    if port_base is not None:
        _move_ports(regions, port_base, workdir / "regions")
    return regions


def _check_mesh(regions: list[LocalRegion]) -> None:
    ports: dict[int, str] = {}
    by_name = {region.name: region for region in regions}
    for region in regions:
        problems = _local_url_problems("redis.url", region.config.redis.url)
        if region.config.cache is not None:
            problems.append("cache: the demo keeps the cache in the region's Redis; remove [cache]")
        if region.port in ports:
            problems.append(f"redis.url: port {region.port} is also {ports[region.port]}'s port")
        ports[region.port] = region.name
        for i, peer in enumerate(region.config.peers):
            where = f"peers[{i}]"
            other = by_name.get(peer.name)
            if other is None:
                problems.append(f"{where}: no file for {peer.name!r} in {region.source.parent}")
                continue
            problems += _local_url_problems(f"{where}.url", peer.url)
            if urlsplit(peer.url).port != other.port:
                problems.append(
                    f"{where}.url: {peer.name}'s Redis is on port {other.port} "
                    f"({other.source}), not {urlsplit(peer.url).port}"
                )
        if problems:
            raise ConfigError(str(region.source), problems)


def _local_url_problems(where: str, url: str) -> list[str]:
    parts = urlsplit(url)
    if parts.scheme != "redis" or parts.hostname not in LOCAL_HOSTS or parts.password:
        return [
            f"{where}: the demo runs Redis on this machine without TLS or password; "
            "use redis://127.0.0.1:PORT/0"
        ]
    return []


def _move_ports(regions: list[LocalRegion], base: int, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    url = {
        region.name: urlsplit(region.config.redis.url)._replace(netloc=f"127.0.0.1:{base + i}")
        for i, region in enumerate(regions)
    }
    replace = msgspec.structs.replace
    for i, region in enumerate(regions):
        config = region.config
        metrics_port = base + len(regions) + i if config.metrics.port else 0
        region.config = replace(
            config,
            redis=replace(config.redis, url=url[region.name].geturl()),
            peers=[replace(peer, url=url[peer.name].geturl()) for peer in config.peers],
            metrics=replace(config.metrics, port=metrics_port),
        )
        region.config_path = directory / f"{region.name}.toml"
        header = f"# Written by invalgw demo: {region.source} with its ports moved to {base}+.\n"
        region.config_path.write_text(header + to_toml(region.config))


def check_ports(regions: list[LocalRegion], *, moved: bool) -> None:
    """Raise :class:`PortInUse` naming the region file and the port if one is taken."""
    for region in regions:
        for what, port in (
            ("redis.url", region.port),
            ("metrics.port", region.config.metrics.port),
        ):
            if port and port_in_use(port):
                where = f"{what}, moved there by --port-base" if moved else what
                raise PortInUse(
                    f"{region.source}: port {port} ({where}) is already in use on 127.0.0.1. "
                    "Stop what listens there (a demo still running elsewhere? a Redis of your "
                    "own?), or move the demo's ports with --port-base PORT."
                )
