"""`python -m selfaug.runner ARGS`, what `selfaug launch` starts: DeepSpeed's runner (`deepspeed.launcher.runner`,
the same arguments) with nothing of a recipe run as code on another node (docs/design.md, "No code from data").

With a hostfile the runner starts every node through pdsh, which joins its arguments into one command line that
the node's shell parses. DeepSpeed's `PDSHRunner` quotes only the arguments that hold a space, inside double
quotes, where `$(...)` and backticks still run: a recipe value (a path given on the command line, a recipe file
under a study's output_dir) would run on every node. `QuotedPDSHRunner` quotes every argument that reaches that
shell with `shlex.quote`, so each arrives as it was given. (The exported environment is the user's own, quoted
as DeepSpeed quotes it.)
"""
from __future__ import annotations

import os
import shlex

from deepspeed.launcher import runner
from deepspeed.launcher.multinode_runner import PDSHRunner


class QuotedPDSHRunner(PDSHRunner):
    """PDSHRunner whose user arguments and working directory are quoted for the remote shell."""

    def __init__(self, args, world_info_base64):
        super().__init__(args, world_info_base64)
        self.user_script = shlex.quote(args.user_script)

    def parse_user_args(self):
        return [shlex.quote(arg) for arg in self.args.user_args]

    def get_cmd(self, environment, active_resources):
        cmd, kill_cmd, env = super().get_cmd(environment, active_resources)
        here = os.path.abspath(".")
        return [f"cd {shlex.quote(here)};" if part == f"cd {here};" else part for part in cmd], kill_cmd, env


def main(argv: list[str] | None = None) -> None:
    runner.PDSHRunner = QuotedPDSHRunner  # what runner.main builds for --launcher pdsh (its default)
    runner.main(argv)


if __name__ == "__main__":
    main()
