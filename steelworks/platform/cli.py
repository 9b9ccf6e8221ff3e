"""The ``steelworks`` command line: one subcommand per stage, ``pipeline``, ``demo``,
``merge``, ``cluster up|down|status`` and ``submit``.

Every stage command takes ``--config FILE`` and any number of ``--set a.b=c`` overrides;
config errors are printed as one line naming the key, and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from steelworks import __version__
from steelworks.core.config import ConfigError, load
from steelworks.platform.cluster import cluster_down, cluster_status, cluster_up
from steelworks.platform.connect import DEFAULT_DASHBOARD_PORT, DEFAULT_PORT, ClusterError, connect
from steelworks.platform.jobs import submit
from steelworks.platform.settings import PipelineConfig

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def _config_args(p: argparse.ArgumentParser, force: bool = True) -> None:
    p.add_argument("--config", "-c", type=Path, default=None,
                   help="YAML run config (default: the built-in defaults, i.e. the demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set pretrain.max_steps=50 (repeatable)")
    if force:
        p.add_argument("--force", action="store_true",
                       help="re-run even if the stage's config and inputs are unchanged")


def _restart_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--restart", action="store_true",
                   help="start the train stage(s) over: removes their checkpoints, HF export and "
                        "metrics (logged). Without it a config change that cannot resume is an "
                        "error and nothing is deleted")


def _load(args) -> PipelineConfig:
    return load(PipelineConfig, args.config, args.overrides)


def _connect(cfg: PipelineConfig) -> None:
    logging.getLogger("steelworks").info("ray: %s", connect(cfg.ray.address, cfg.ray.num_cpus))


def cmd_compare(args) -> int:
    from steelworks.evals.compare import compare, render_markdown, write_comparison

    if len(args.runs) != 2:
        raise ConfigError("eval compare needs two eval directories: steelworks eval compare A B")
    try:
        result = compare(*args.runs)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from e
    print(render_markdown(result))
    if args.out:
        print("wrote " + ", ".join(write_comparison(result, args.out)))
    return 0


def cmd_stage(args) -> int:
    from steelworks.platform import pipeline

    if getattr(args, "action", None) == "compare":
        return cmd_compare(args)
    cfg = _load(args)
    if args.command != "eval" or pipeline.eval_uses_ray(cfg):  # else Ray is not needed at all
        _connect(cfg)
    if args.command == "eval":
        results = {"eval": pipeline.run_eval(cfg, force=args.force, model_dir=args.model)}
    elif args.command == "data":
        # The whole data/ side: clean the corpus, then train the tokenizer and pack shards.
        results = {name: pipeline.RUNNERS[name](cfg, force=args.force)
                   for name in ("data", "tokenizer")}
    elif args.command in pipeline.TRAIN_STAGES:
        results = {args.command: pipeline.RUNNERS[args.command](cfg, force=args.force,
                                                                restart=args.restart)}
    else:
        results = {args.command: pipeline.RUNNERS[args.command](cfg, force=args.force)}
    print(pipeline.summarize(cfg, results))
    return 0


def cmd_pipeline(args) -> int:
    from steelworks.platform import pipeline

    cfg = _load(args)
    _connect(cfg)
    results = pipeline.run_pipeline(cfg, force=args.force, restart=args.restart)
    print(pipeline.summarize(cfg, results))
    return 0


def cmd_demo(args) -> int:
    args.config = args.config or DEMO_CONFIG
    return cmd_pipeline(args)


def cmd_serve(args) -> int:
    import time

    from steelworks.core.rundir import stage_path
    from steelworks.core.storage import location
    from steelworks.serve.deployment import deploy

    cfg = _load(args)
    cfg.serve.keep_running = True
    _connect(cfg)
    from steelworks.platform.pipeline import final_model_stage

    trained = final_model_stage(cfg)  # dpo when the run's stages have it, else sft
    # A run in a bucket: its model is fetched into this machine's mirror first.
    model = args.model or str(stage_path(location(cfg.runs_dir, cfg.run, trained, "hf")))
    if not (Path(model) / "config.json").exists() and (Path(model) / "hf" / "config.json").exists():
        model = str(Path(model) / "hf")  # a train stage's directory: serve its HF export
    if not (Path(model) / "config.json").exists():
        raise ConfigError(f"--model {model}: not a Hugging Face model directory (run the {trained} "
                          f"stage first, or point --model at runs/<run>/{trained}/hf)")
    cfg.serve.model_name = cfg.serve.model_name or cfg.data.demo.model_name
    exam = _demo_exam(cfg)
    if exam and "demo" not in cfg.serve.benchmarks:  # POST /v1/evals {"benchmark": "demo"}
        cfg.serve.benchmarks["demo"] = exam
    url = deploy(model, cfg.serve)
    # Never the key itself (stdout ends up in terminals, CI logs and screenshots): the
    # variable it came from, which the shell expands, or a placeholder for a config-file key.
    auth = ""
    if cfg.serve.api_key:
        auth = " -H 'Authorization: Bearer <your key>'"
    elif cfg.serve.resolve_api_key():
        auth = f' -H "Authorization: Bearer ${cfg.serve.api_key_env}"'
    engine = _served_engine(url)
    print(f"serving {model} as '{cfg.serve.model_name}' ({engine} engine) at {url}/v1  "
          f"(Ctrl-C to stop)\n"
          f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
          f"    -d '{{\"model\": \"{cfg.serve.model_name}\", \"messages\": "
          f"[{{\"role\": \"user\", \"content\": \"你是谁？\"}}]}}'\n"
          f"  web chat: {url}/chat   metrics: {url}/metrics", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from steelworks.serve.deployment import shutdown

        shutdown()
    return 0


# The same names as steelworks.train.merge.METHODS (a test checks): spelled out here so that
# building the parser does not import torch, which would slow every command's start.
MERGE_METHODS = ("linear", "task_arithmetic", "slerp")


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge the given directories; needs neither a run config nor Ray (it reads and writes
    files only), so it works on a laptop beside a copy of the checkpoints."""
    from steelworks.train.merge import merge_dirs

    try:
        out = merge_dirs(args.method, args.models, args.out, base=args.base,
                         weights=args.weights, t=args.t)
    except ValueError as e:
        # Bad input (mismatched models, wrong options), not a config-file problem: its own prefix.
        print(f"steelworks merge: {e}", file=sys.stderr)
        return 2
    print(f"merged {len(args.models)} model(s) with {args.method} into {out}")
    return 0


def _served_engine(url: str) -> str:
    """Which engine the replica chose (serve.engine: auto decides in the replica), from
    /health, which needs no key."""
    import httpx

    try:
        return str(httpx.get(f"{url}/health", timeout=10).json().get("engine", "unknown"))
    except (httpx.HTTPError, ValueError):
        return "unknown"


def _demo_exam(cfg) -> str | None:
    """The run's demo exam directory, when its data stage built one."""
    import json

    from steelworks.core.rundir import MANIFEST, run_dir
    from steelworks.core.storage import Remote, is_uri, join

    local = run_dir(cfg.runs_dir, cfg.run) / "data"
    if is_uri(cfg.runs_dir):  # fetch the exam's files only, not the whole data stage
        remote = Remote(join(cfg.runs_dir, cfg.run, "data"))
        if not remote.exists(MANIFEST):
            return None
        manifest = remote.read_json(MANIFEST)
        if exam := manifest.get("exam"):
            remote.pull(local, {rel: m["bytes"] for rel, m in manifest["outputs"].items()
                                if rel.startswith(f"{exam}/")})
    else:
        if not (local / MANIFEST).exists():
            return None
        exam = json.loads((local / MANIFEST).read_text()).get("exam")
    return str((local / exam).resolve()) if exam else None


STAGE_HELP = {
    "data": "read, normalize, filter and deduplicate the corpus (the demo corpus by default), "
            "then run the tokenizer stage: the token shards train/ reads",
    "tokenizer": "train the BPE tokenizer and tokenize+mix+pack the cleaned text and SFT "
                 "data into shards (re-runs only this half of `data`)",
    "pretrain": "pretrain a model on the packed shards with Ray Train (FSDP2)",
    "sft": "fine-tune the pretrained model on the SFT shards (prompt tokens masked)",
    "dpo": "preference-tune the SFT model with DPO on {prompt, chosen, rejected} JSONL "
           "(dpo.data; the demo corpus has its own): reference log-probs once on Ray Data, "
           "then Ray Train",
    "eval": "score a model on a multiple-choice benchmark (the demo exam by default)",
}


def _add_merge_command(sub: Any) -> None:
    """``steelworks merge``: no config file and no Ray, just directories in and out."""
    p = sub.add_parser("merge", help="combine models of one architecture into a new HF directory "
                       "(linear average, task arithmetic or SLERP)",
                       description="Merge HF model directories tensor by tensor and write an HF "
                       "directory (weights, config and tokenizer of the base or first model, and "
                       "merge.json). No Ray.")
    p.add_argument("--method", required=True, choices=MERGE_METHODS,
                   help="linear: weighted average (weights normalised to sum 1); task_arithmetic: "
                        "base + sum w_i * (model_i - base) (weights as given, default 1); slerp: "
                        "spherical interpolation of two models at --t")
    p.add_argument("--models", required=True, nargs="+", type=Path, metavar="DIR",
                   help="the HF model directories to merge")
    p.add_argument("--base", type=Path, default=None, metavar="DIR",
                   help="task_arithmetic: the model the others were fine-tuned from")
    p.add_argument("--weights", type=float, nargs="+", default=None, metavar="W",
                   help="one weight per --models entry (linear, task_arithmetic)")
    p.add_argument("--t", type=float, default=None,
                   help="slerp: 0 gives the first model, 1 the second")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    p.set_defaults(func=cmd_merge)


def _cmd_cluster(args: argparse.Namespace) -> int:
    """``steelworks cluster up|down|status`` (``cluster.py``); a :class:`ClusterError` is
    printed as one line and exits with status 1."""
    try:
        if args.action == "up":
            cluster_up(args.num_cpus, args.port, args.dashboard_port, args.temp_dir,
                       extra_args=args.ray_arg, autoscaling=args.autoscaling)
            return 0
        if args.action == "down":
            return cluster_down(args.port, all_local=args.all)
        # A non-default --port names a cluster `ray status` cannot find by itself (Ray only
        # records the last `ray start` of the default temp dir).
        address = args.address or (f"127.0.0.1:{args.port}" if args.port != DEFAULT_PORT
                                   else None)
        return cluster_status(address)
    except ClusterError as e:
        print(f"steelworks: {e}", file=sys.stderr)
        return 1


def _split_submit_args(rest: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Pull submit's own options out of the job command: they may follow the steelworks
    command (``submit pipeline --config x --no-wait``); after a ``--`` nothing is ours."""
    opts: dict[str, Any] = {}
    job: list[str] = []
    i = 0
    while i < len(rest):
        a = rest[i]
        if a == "--":
            job += rest[i + 1:]
            break
        if a == "--no-wait":
            opts["wait"] = False
        elif a in ("--upload", "--no-upload"):
            opts["upload"] = a == "--upload"
        elif a in ("--address", "--working-dir", "--env") and i + 1 < len(rest):
            opts.setdefault(a, []).append(rest[i + 1])
            i += 1
        elif a.split("=", 1)[0] in ("--address", "--working-dir", "--env") and "=" in a:
            key, value = a.split("=", 1)
            opts.setdefault(key, []).append(value)
        else:
            job.append(a)
        i += 1
    return job, opts


def _cmd_submit(args: argparse.Namespace) -> int:
    """``steelworks submit [options] COMMAND ...``: the command as a Ray job (``jobs.py``)."""
    job, opts = _split_submit_args(list(args.job_args))
    if not job:
        print("steelworks: submit needs a steelworks command, e.g. "
              "`steelworks submit pipeline --config configs/demo.yaml`", file=sys.stderr)
        return 2
    address = (opts.get("--address") or [args.address])[-1]
    working_dir = (opts.get("--working-dir") or [args.working_dir])[-1]
    env: dict[str, str] = {}
    for item in list(args.env) + opts.get("--env", []):
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"steelworks: --env {item!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
        env[key] = value
    wait = opts.get("wait", not args.no_wait)
    upload = opts.get("upload", args.upload)
    return submit(job, address, working_dir, wait, env, upload)


def add_cluster_commands(subparsers: Any) -> None:
    """Add ``cluster up|down|status`` and ``submit`` to the ``steelworks`` CLI."""
    p = subparsers.add_parser(
        "cluster", help="start, stop or inspect a token-protected Ray cluster on this machine",
        description="Manage a local Ray head (`ray start --head` with RAY_AUTH_MODE=token). "
        "`up` prints what to export for plain `ray job submit`; `down` stops only the "
        "cluster on --port (use --all for `ray stop`, which kills every Ray process here).")
    p.add_argument("action", choices=["up", "down", "status"], help="what to do")
    p.add_argument("--num-cpus", type=int, default=None,
                   help="logical CPUs of the head (default: max(4, cores), overcommitted so "
                   "Ray Train workers + controller + Ray Data fit on small machines)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="GCS port (default %(default)s)")
    p.add_argument("--dashboard-port", type=int, default=DEFAULT_DASHBOARD_PORT,
                   help="dashboard / job API port, bound to 127.0.0.1 (default %(default)s)")
    p.add_argument("--temp-dir", default=None,
                   help="Ray's temp/session dir for `up` (default /tmp/ray)")
    p.add_argument("--autoscaling", default=None, metavar="CONFIG",
                   help="`up`: run Ray's autoscaler with this fake_multinode config (e.g. "
                   "cluster-local.yaml): worker nodes are started on this machine "
                   "when tasks wait for resources and removed when idle; the head gets the "
                   "config's head resources")
    p.add_argument("--ray-arg", action="append", default=[], metavar="ARG",
                   help="`up`: pass ARG on to `ray start --head` (repeatable), e.g. "
                   "--ray-arg=--dashboard-agent-listen-port=52366 when another cluster on this "
                   "machine holds Ray's default ports (10001, 52365)")
    p.add_argument("--address", default=None,
                   help="GCS address for `status` (default: 127.0.0.1:PORT when --port is "
                   "given, else the cluster `ray start` recorded)")
    p.add_argument("--all", action="store_true",
                   help="`down`: run `ray stop`, stopping EVERY Ray process on this machine")
    p.set_defaults(func=_cmd_cluster)

    p = subparsers.add_parser(
        "submit", help="run a steelworks command as a Ray job (ray job submit, token auth)",
        description="Run `python -m steelworks COMMAND ...` on a Ray cluster as a job, "
        "uploading this directory (without .venv, runs, .git) to a remote cluster; a cluster "
        "on this machine shares its disk, so there the job runs in place (--upload/--no-upload "
        "override). On a local cluster the job's runs_dir is made absolute so outputs land in "
        "./runs. Example: "
        "steelworks submit pipeline --config configs/demo.yaml --set pretrain.max_steps=20",
        epilog="--address/--working-dir/--env/--no-wait/--upload/--no-upload may also follow the "
        "command; put the "
        "command after `--` to pass such options through to it unchanged.")
    p.add_argument("--address", default=None,
                   help="dashboard URL (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS if a "
                   f"URL, else http://127.0.0.1:{DEFAULT_DASHBOARD_PORT})")
    p.add_argument("--working-dir", default=".", help="the job's cwd: uploaded, or used in place "
                   "on a cluster that shares this disk")
    p.add_argument("--upload", dest="upload", action="store_true", default=None,
                   help="ship --working-dir as the job's package (default for a remote address)")
    p.add_argument("--no-upload", dest="upload", action="store_false",
                   help="run in --working-dir in place: the cluster shares this disk (default for "
                   "a local address, e.g. cluster-local.yaml's fake nodes)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job (repeatable)")
    p.add_argument("--no-wait", action="store_true",
                   help="return after submitting instead of streaming the job's log")
    p.add_argument("job_args", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                   help="the steelworks command to run, e.g. pipeline --config FILE")
    p.set_defaults(func=_cmd_submit)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="steelworks",
        description="Raw text -> tokenizer -> pretrain -> SFT -> eval -> serve, on Ray. "
        "Each stage writes runs/<run>/<stage>/ with a manifest and is skipped when unchanged.")
    parser.add_argument("--version", action="version", version=f"steelworks {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in STAGE_HELP.items():
        p = sub.add_parser(name, help=text, description=text)
        _config_args(p)
        if name in ("pretrain", "sft", "dpo"):
            _restart_arg(p)
        if name == "eval":
            p.add_argument("--model", default=None,
                           help="evaluate this HF model directory instead of the run's final "
                                "model (sft/hf, or dpo/hf when the stages include dpo)")
            p.add_argument("action", nargs="?", choices=["compare"],
                           help="`eval compare A B`: line up two eval runs (directories with "
                                "report.json) subject by subject and list the flipped items")
            p.add_argument("runs", nargs="*", help="the two eval directories to compare")
            p.add_argument("--out", default=None, help="compare: also write compare.json/.md here")
        p.set_defaults(func=cmd_stage)
    p = sub.add_parser("pipeline", help="run the stages in order (data .. serve); finished "
                       "stages with unchanged config and inputs are skipped",
                       description="Run data -> tokenizer -> pretrain -> sft -> eval -> serve.")
    _config_args(p)
    _restart_arg(p)
    p.set_defaults(func=cmd_pipeline)
    p = sub.add_parser("demo", help="the whole pipeline on the embedded demo corpus (configs/demo.yaml)",
                       description="Run the pipeline on the demo config and print a summary.")
    _config_args(p)
    _restart_arg(p)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("serve", help="serve a model on Ray Serve with an OpenAI-compatible API",
                       description="Deploy an HF model directory on Ray Serve and keep serving.")
    _config_args(p, force=False)
    p.add_argument("--model", default=None, help="HF model directory (default: runs/<run>/sft/hf, "
                   "or dpo/hf when the config's stages include dpo)")
    p.set_defaults(func=cmd_serve)
    _add_merge_command(sub)
    add_cluster_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"steelworks: config error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"steelworks: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
