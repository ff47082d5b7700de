"""The `lmpack` command group."""

from __future__ import annotations

import click

from lmpack import __version__
from lmpack.cli.agent import agent_command, rollback_command, status_command, switch_command
from lmpack.cli.build import build_command, pull_command
from lmpack.cli.bundle import keygen_command, pack_command, sign_command, verify_command
from lmpack.cli.catalog import profiles_group, targets_group
from lmpack.cli.doctor import doctor_command
from lmpack.cli.fleet import fleet_group
from lmpack.cli.install import install_command, list_command, uninstall_command
from lmpack.cli.serve import generate_command, serve_command


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="lmpack")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def cli(debug: bool) -> None:
    """Build, bundle and serve language models on your own hardware.

    \b
    Examples:
      lmpack targets list
      lmpack targets show a100
      lmpack build ./SmolLM2-135M-Instruct.Q4_1.gguf --target cpu-x86 --profile int8 -o dist/
      lmpack build sentence-transformers/all-MiniLM-L6-v2 --target cpu-x86 --profile int8
      lmpack serve dist/smollm2-135m-instruct.q4-1-cpu-x86-int8
      lmpack pack dist/smollm2-135m-instruct.q4-1-cpu-x86-int8 -o smollm2.lmpack --name smollm2 --version 1.0.0
      lmpack install smollm2.lmpack --prefix /opt/lmpack --public-key release.pub
      lmpack agent --config /etc/lmpack/agent.toml
      lmpack switch smollm2 1.1.0

    Exit codes are listed in docs/cli.md.
    """


for command in (
    targets_group,
    profiles_group,
    pull_command,
    build_command,
    pack_command,
    verify_command,
    keygen_command,
    sign_command,
    install_command,
    list_command,
    uninstall_command,
    serve_command,
    generate_command,
    doctor_command,
    agent_command,
    status_command,
    switch_command,
    rollback_command,
    fleet_group,
):
    cli.add_command(command)


def main() -> None:
    cli()
