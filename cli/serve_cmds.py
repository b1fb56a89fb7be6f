"""``serve``: the index in a browser and as a JSON API (Starlette on uvicorn)."""

from __future__ import annotations

import errno
import ipaddress
import socket

import click

from retrieval.units import counted

from .options import device_option, index_option, open_index, weights_option

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    """True when only this machine can reach ``host`` (a name is resolved to check)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` before the server is announced, so a port in use is one
    clear line rather than a "serving at" line and then uvicorn's error (port 0: a free one).
    The family is chosen as uvicorn chooses it: IPv6 for an address with a colon."""
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        if exc.errno == errno.EADDRINUSE:
            raise click.ClickException(
                f"port {port} on {host} is in use (another server?); choose one with --port"
            ) from None
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return listener


def parse_size(ctx, param, value: str) -> int:
    from retrieval.units import parse_bytes

    try:
        size = parse_bytes(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    if size < 1:
        raise click.BadParameter("must be at least 1 byte")
    return size


@click.command("serve")
@index_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--token",
    default=None,
    envvar="RETRIEVE_TOKEN",
    help="Require 'Authorization: Bearer TOKEN' on every API call [env RETRIEVE_TOKEN].",
)
@click.option(
    "--allow-url",
    is_flag=True,
    help='Let POST /api/query fetch {"url": ...} (off: it would reach your network).',
)
@click.option(
    "--max-upload",
    default="20MB",
    show_default=True,
    callback=parse_size,
    help="Largest request body; larger ones get 413.",
)
@click.option(
    "--search-precision",
    type=click.Choice(["auto", "fp32", "bf16"]),
    default="auto",
    show_default=True,
    help="Exact (Flat) search on a CPU: bf16 scans a copy in memory (half the size of the "
    "vectors file) and re-ranks its best k + 64 exactly in fp32; fp32 scans the mapped file; "
    "auto: bf16 where the CPU has it natively and the copy fits in a quarter of the memory.",
)
@weights_option
@device_option
def serve_command(
    index_dir, host, port, token, allow_url, max_upload, search_precision, weights, device
):
    """Serve the index: a page to search it by image and browse it, and a JSON API."""
    import uvicorn

    from retrieval.serve import ServeOptions, create_app

    if not token and not is_loopback(host):
        click.echo(
            f"warning: serving on {host} without --token: anyone who can reach it can "
            "search and download every indexed image",
            err=True,
        )
    options = ServeOptions(max_upload=max_upload, token=token, allow_url=allow_url)
    with open_index(index_dir, weights, device, search_precision) as index:
        app = create_app(index, options)
        with listening_socket(host, port) as listener:
            port = listener.getsockname()[1]  # the one chosen, for --port 0
            shown = f"[{host}]" if ":" in host else host
            suffix = "/#token=" + token if token else "/"
            click.echo(
                f"serving {counted(index.count, 'image')} from {index.directory} at "
                f"http://{shown}:{port}{suffix} (Ctrl+C stops)",
                err=True,
            )
            config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
            uvicorn.Server(config).run(sockets=[listener])


def register(group: click.Group) -> None:
    group.add_command(serve_command)
