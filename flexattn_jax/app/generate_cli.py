"""``flexattn-jax generate``: answer questions about images with a converted checkpoint, one image or a
JSONL batch streamed through the jitted buckets (answers written in input order, resumable). Its
model options and checks are shared with ``serve``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flexattn_jax.app.inference import GenerationOptions
    from flexattn_jax.config import ModelConfig


def add_compile_cache_args(p: argparse.ArgumentParser) -> None:
    """``--compile-cache`` / ``--no-compile-cache`` (for :func:`~flexattn_jax.app.compile_cache.setup_compile_cache`)."""
    p.add_argument("--compile-cache", metavar="DIR", default=None,
                   help="JAX persistent compilation cache: a second identical call loads the compiled program instead of "
                   "compiling (default: $FLEXATTN_JAX_CACHE, else $XDG_CACHE_HOME/flexattn-jax/jax, else ~/.cache/flexattn-jax/jax)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="compile from scratch, write no cache (also: environment FLEXATTN_JAX_COMPILE_CACHE=0)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """How a converted checkpoint runs: ``--dtype``, ``--quantize``, ``--mesh`` (generate, serve)."""
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="compute/param dtype (default: as converted)")
    from flexattn_jax.quant import MODES

    p.add_argument("--quantize", choices=MODES, default=None,
                   help="weight-only quantise the decoder linears at load (int8 per channel, int4 per group, nf4 per block; docs/lora.md)")
    p.add_argument("--mesh", metavar="SPEC", default=None,
                   help="devices to run on, e.g. 'data=8', 'data=2,tensor=4' or 'data=-1' (all devices): parameters sharded by "
                   "the rules table (heads, MLP and vocabulary over tensor, the embedding over fsdp), "
                   "each batch split over the data axis (default: one device)")


def generate_options_args():
    """``generate``'s flags of the generation options (:class:`~flexattn_jax.app.inference.GenerationOptions`)."""
    from flexattn_jax.app.inference import generation_args

    return generation_args(("max_new_tokens", "batch_size", "temperature", "top_p", "seed", "hr_budget", "hr_strategy", "workers",
                            "window"))


def generate_parser(prog: str = "flexattn-jax generate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Answer questions about images with a converted checkpoint: one --image and --prompt, or a --batch "
        "JSONL. The batch file is read lazily and preprocessed in a thread pool ahead of the device; items are grouped "
        "into length buckets (one compile per bucket) and each answer is written to --output as soon as its batch is "
        "done, in input order, so memory does not grow with the number of items. A bad item (an unreadable JSONL line, "
        "a missing, corrupt or undecodable image, an empty or too long prompt, more than one <image>) gets an 'error' "
        "in its place and the other items are still answered. Ctrl-C or SIGTERM (however the process was started) "
        "finishes the batch in flight, writes what is done and exits with status 130 or 143; --resume then finishes the run. "
        "The --output file starts with a header record (the checkpoint's fingerprint, the settings that change an answer, "
        "the --batch file's identity); --resume refuses a file whose header differs (naming what changed) or that this "
        "command did not write, and leaves it as it is. An existing --output is refused without --resume or --overwrite. "
        "One run writes an --output at a time: it holds a lock (OUTPUT.lock, with its PID) for the whole run, and a "
        "second run on the same path is refused at once, naming that PID; a lock left by a killed run is taken over.",
        epilog="exit status: 0 when at least one item was answered (or all were answered before, with --resume); "
        "1 when every item failed (single --image: it failed), or when --output cannot be written (a full disk: the "
        "answers written stay, --resume finishes); 2 on bad arguments, an unreadable --batch file or checkpoint, a --resume "
        "refused, an --output in use by another run or existing without --resume/--overwrite; 130 when interrupted (Ctrl-C, "
        "SIGINT), 143 when stopped by SIGTERM.",
    )
    p.add_argument("--checkpoint", required=True, help="a directory written by `flexattn-jax convert` (params + tokenizer)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="one image file (with --prompt); a failure exits with status 1 and a message on stderr")
    src.add_argument("--batch", help="JSONL with one {\"image\": path, \"prompt\": text} object per line (blank lines skipped; "
                     "a line that is not UTF-8 JSON of that shape gets an error naming the file and line)")
    p.add_argument("--prompt", help="the question about --image (an optional <image> tag is moved to the front)")
    p.add_argument("--output", help="JSONL of answers for --batch, one per input item, in input order, each written when "
                   "its batch is done, after a header record: index (0-based item number), line (in --batch), image, "
                   "image_sha256, prompt, answer, error (null when fine) and, with --save-attention, attention (the PNG) "
                   "(default: stdout, records only)")
    p.add_argument("--resume", action="store_true",
                   help="keep the answers already in --output (matched by index, image path, image content hash and prompt; "
                   "failed items are retried), answer the rest, then sort the file: it ends equal to an uninterrupted run's "
                   "(greedy decoding). Refused, and the file left as it is, when the file's header differs from this run "
                   "(another checkpoint, --batch file, --max-new-tokens, sampling, --hr-budget, --hr-strategy, --dtype or "
                   "--set) or when this command did not write it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output (without it, or --resume, a non-empty --output is refused and left "
                   "as it is); the old answers are replaced when the first new record is written")
    add_compile_cache_args(p)
    generate_options_args().add(p.add_argument_group("generation (GenerationOptions)"))
    add_model_args(p)
    p.add_argument("--save-attention", metavar="DIR", default=None,
                   help="write one PNG per answered item into DIR (created): the image under a heat map of the last "
                   "prompt token's attention over its LR tokens (with a colour bar), the HR tokens selected for the last "
                   "hierarchical layer outlined, the question and answer as the title (FlexAttention checkpoints)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. flex.threshold=48")
    return p


def read_batch(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(line number, Request)`` for each non-blank line of a JSONL file, read lazily.

    The file is opened at once (an unreadable file raises ValueError). A line that is not UTF-8, not
    JSON, starts with a byte-order mark, lacks a string ``image`` / ``prompt`` or holds one that is not valid
    UTF-8 text (an unpaired surrogate escape such as ``\\ud800``) becomes a Request
    carrying an ``error`` that names the file and the line: it is answered with that error in place.
    """
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ValueError(f"cannot read --batch file {path}: {e.strerror or e}") from e
    return _batch_lines(Path(path), f)


def _batch_lines(path: Path, f) -> Iterator[tuple[int, Any]]:
    from flexattn_jax.app.inference import Request
    from flexattn_jax.preprocess import text_problem

    with f:
        for n, raw in enumerate(f, 1):
            where = f"{path} line {n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, Request(None, None, error=f"{where}: not UTF-8 text ({e.reason} at byte {e.start})")
                continue
            if line.startswith("\ufeff"):
                yield n, Request(None, None, error=f"{where}: starts with a UTF-8 byte-order mark (BOM); "
                                 "save the file as UTF-8 without BOM")
                continue
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                yield n, Request(None, None, error=f"{where}: not JSON ({e})")
                continue
            if not isinstance(item, dict):
                yield n, Request(None, None, error=f"{where}: expected an object {{\"image\": ..., \"prompt\": ...}}, "
                                 f"got {type(item).__name__}")
                continue
            bad = next((f"missing field {k!r}" if k not in item else f"field {k!r} must be a string, got {type(item[k]).__name__}"
                        for k in ("image", "prompt") if not isinstance(item.get(k), str)), None)
            bad = bad or next((f"field {k!r} is {p}" for k in ("image", "prompt") if (p := text_problem(item[k])) is not None), None)
            if bad:
                yield n, Request(None, None, error=f"{where}: {bad}")
                continue
            yield n, Request(item["image"], item["prompt"])


def _png_name(index: int, image) -> str:
    stem = Path(image).stem if isinstance(image, str | Path) else "image"
    return f"{index:04d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', stem)[:60]}.png"


def save_attention_png(out_dir: str | Path, index: int, req, ans, cfg) -> str | None:
    """The overlay PNG of one answered item (see :mod:`flexattn_jax.app.visualize`); its path, None when it has no maps."""
    from flexattn_jax.app.inference import request_image
    from flexattn_jax.app.visualize import answer_maps, mask_layer, save_overlay

    layer = mask_layer(cfg)
    att, mask = answer_maps(ans, cfg, layer)
    if ans.error or att is None:
        return None
    path = Path(out_dir) / _png_name(index, req.image)
    return str(save_overlay(path, request_image(req), att, mask, question=req.prompt, answer=ans.text or "", layer=layer))


def _stats_line(stats: dict, cache) -> str:
    """One stderr line: items, compile time apart from the steady state, latency."""
    parts = [f"{stats.get('answered', 0)} answered, {stats.get('failed', 0)} failed"
             + (f", {stats['skipped']} already done" if stats.get("skipped") else "")
             + f" in {stats.get('seconds', 0):.1f} s",
             f"compile {stats.get('compile_s', 0):.1f} s ({stats.get('compiles', 0)} programs"
             + (f"; persistent cache: {cache.hits} hits, {cache.misses} misses" if cache is not None else "") + ")",
             f"steady {stats.get('steady_items_per_s', 0):.2f} items/s, {stats.get('steady_tokens_per_s', 0):.1f} tokens/s "
             f"({stats.get('tokens', 0)} tokens, {stats.get('decode_steps', 0)} decode steps)"]
    if stats.get("batch_latency_p50_s") is not None:
        parts.append(f"batch latency p50 {stats['batch_latency_p50_s']:.2f} s, max {stats['batch_latency_max_s']:.2f} s")
    if stats.get("first_answer_s") is not None:
        parts.append(f"first answer after {stats['first_answer_s']:.1f} s")
    return "; ".join(parts)


def check_generate_args(args: argparse.Namespace) -> GenerationOptions:
    """The generate flags that need no checkpoint, and every output path, checked before any work; the generation options.

    Raises ValueError (an :class:`~flexattn_jax.paths.OutputPathError` for paths) naming the flag and value.
    """
    from flexattn_jax.paths import check_output_dir, check_output_file

    if args.image and args.prompt is None:
        raise ValueError("--image needs --prompt")
    options = generate_options_args().build(args)
    if args.resume and not (args.batch and args.output):
        raise ValueError("--resume needs --batch and --output (the file to finish)")
    if args.overwrite and (args.resume or not (args.batch and args.output)):
        raise ValueError("--overwrite needs --batch and --output, and not --resume")
    inputs = [args.checkpoint, args.batch, args.image]
    if args.batch and args.output:
        check_output_file(args.output, sources=inputs, flag="--output")
    if args.save_attention:
        check_output_dir(args.save_attention, sources=inputs, exist_ok=True, flag="--save-attention")
    return options


def check_replace(args: argparse.Namespace) -> None:
    """Finished answers are never replaced silently: an existing non-empty regular ``--output`` needs ``--resume``
    (finish it) or ``--overwrite`` (replace it); ValueError naming both otherwise."""
    out = Path(args.output) if args.batch and args.output else None
    if out is None or args.resume or args.overwrite or not out.is_file() or out.stat().st_size == 0:
        return
    raise ValueError(f"--output {out} already exists ({out.stat().st_size:,} bytes of answers); it was left as it is: "
                     "pass --resume to finish it, --overwrite to replace it, or use another --output")


def check_context(cfg: ModelConfig, max_new_tokens: int) -> None:
    """``--max-new-tokens`` must leave room for a prompt with its image in the model's context."""
    from flexattn_jax.preprocess import longest_prompt

    least = cfg.num_image_tokens + 2  # BOS, the image, one token of prompt
    room = longest_prompt(cfg.text.max_position_embeddings, max_new_tokens)
    if room < least:
        most = cfg.text.max_position_embeddings - least
        raise ValueError(
            f"--max-new-tokens {max_new_tokens}: the model's context is {cfg.text.max_position_embeddings} tokens "
            f"(max_position_embeddings) and a prompt with its image needs at least {least}; use at most {most}"
        )


def inference_config(args: argparse.Namespace, cfg: ModelConfig, options: GenerationOptions) -> ModelConfig:
    """``cfg`` with ``--set`` and the options' ``--hr-budget`` applied (validated): the config generate and serve run."""
    from flexattn_jax.overrides import apply_overrides

    return options.model_config(apply_overrides(cfg, list(args.set)))


def check_backend(cfg: ModelConfig) -> None:
    """Refuse a kernel the backend cannot run (``attention_impl='cudnn'`` off a GPU) before anything is loaded."""
    import jax

    from flexattn_jax.attention import require_platform

    require_platform(cfg.attention_impl, jax.default_backend())


def answer_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings that change an answer (an answer file's header): the generation options' and the model's."""
    options = generate_options_args().build(args)
    return {**options.answer_settings(), "dtype": args.dtype, "quantize": args.quantize, "set": list(args.set)}


def _generate(argv: list[str]) -> int:
    from flexattn_jax.app.inference import Request, load_for_inference
    from flexattn_jax.app.resume import AnswerLog, OutputLock, checkpoint_fingerprint, input_identity, lock_output, make_header
    from flexattn_jax.checkpoint import read_config
    from flexattn_jax.interrupt import StopRequests
    from flexattn_jax.tokenizer import check_tokenizer_vocab, load_tokenizer

    args = generate_parser().parse_args(argv)
    lock = OutputLock(None)
    with StopRequests() as stop, contextlib.ExitStack() as held:
        try:  # every check that can fail runs before the parameters are restored
            options = check_generate_args(args)
            if args.batch and args.output:  # one writer per answers file, for the whole run
                lock = held.enter_context(lock_output(args.output, "--output"))
                if lock.stale_pid is not None:
                    print(f"note: took over the lock of {args.output} left by PID {lock.stale_pid} (no longer running)",
                          file=sys.stderr)
            check_replace(args)
            cfg = inference_config(args, read_config(args.checkpoint), options)
            check_backend(cfg)
            check_context(cfg, options.max_new_tokens)
            tokenizer = load_tokenizer(args.checkpoint)
            check_tokenizer_vocab(tokenizer, cfg.text.vocab_size)
            lines = iter([(0, Request(args.image, args.prompt))]) if args.image else read_batch(args.batch)
            header = None
            if args.batch and args.output:
                header = make_header("generate answers", checkpoint=checkpoint_fingerprint(args.checkpoint),
                                     settings=answer_settings(args), input=input_identity(args.batch))
            log = AnswerLog.scan(args.output, header) if args.resume else None
            if stop.requested:
                return _stopped(stop, "before loading the checkpoint; nothing written")
            params, cfg, mesh = load_for_inference(args.checkpoint, args.dtype, args.mesh, options.batch_size, args.quantize)
            cfg = inference_config(args, cfg, options)
            if args.save_attention:
                Path(args.save_attention).mkdir(parents=True, exist_ok=True)
        except (ValueError, OSError) as e:  # ConvertError, ShardingError, ConfigError, OutputPathError, ResumeError are ValueErrors
            print(f"error: {e}", file=sys.stderr)
            return 2
        if stop.requested:
            return _stopped(stop, "after loading the checkpoint; nothing written")
        from flexattn_jax.app.compile_cache import setup_compile_cache

        cache = setup_compile_cache(args.compile_cache, disabled=args.no_compile_cache)
        if args.save_attention and not cfg.flex.enabled:
            logging.getLogger(__name__).warning("--save-attention: FlexAttention is off in this checkpoint, no attention maps to draw")
        return _answer_all(args, options, params, cfg, tokenizer, mesh, lines, log, header, cache, stop)


def _stopped(stop, when: str) -> int:
    print(f"stopped {when}", file=sys.stderr)
    return stop.exit_code


class _Output:
    """--output opened at the first record (an interrupted or failed run before any answer leaves no file), the
    header written first into a new or empty file; appended to with --resume."""

    def __init__(self, path: str, header: dict | None, log) -> None:
        self.path, self.header, self.log = path, header, log
        self.f = None
        self.written = 0  # records flushed to the file by this run

    def write(self, line: str) -> None:
        """Append one record (flushed); a write that fails (a full disk) raises :class:`_WriteFailed`."""
        from flexattn_jax.app.resume import write_header

        try:
            if self.f is None:
                appending = self.log is not None and self.log.has_header
                self.f = open(self.path, "a" if appending else "w", encoding="utf-8")
                if not appending and self.header is not None:
                    write_header(self.f, self.header)
            if line:
                self.f.write(line)
                self.f.flush()
                self.written += 1
        except OSError as e:
            raise _WriteFailed(f"cannot write --output {self.path} ({e.strerror or e})") from e

    def close(self) -> None:
        if self.f is not None:
            with contextlib.suppress(OSError):  # a full disk: already reported by write
                self.f.close()


class _WriteFailed(Exception):
    """The answers file cannot be written (a full disk): the run stops, what was flushed stays."""


def _answer_all(args, options, params, cfg, tokenizer, mesh, lines, log, header, cache, stop) -> int:
    """Stream the answers to --output (or stdout) in input order; a stop request writes what is done and returns 130/143."""
    from flexattn_jax.app.inference import InputOrder, stream_answers
    from flexattn_jax.app.resume import content_key, image_sha256

    meta: dict[int, tuple[int, object, str | None]] = {}  # index -> (line, request, image hash), read and not yet written
    order = InputOrder()
    single = args.image is not None
    resumable = args.batch is not None and args.output is not None

    def requests():  # runs on the pipeline's reader thread: the image hashes are computed ahead of the device
        for i, (n, req) in enumerate(lines):
            digest = image_sha256(req.image) if resumable and req.error is None else None
            meta[i] = (n, req, digest)
            yield req

    def key(i: int, req) -> str:
        image = None if req.image is None else str(req.image)
        return content_key(image, req.prompt, req.error, meta[i][2])

    def skip(i: int, req) -> bool:
        if log is not None and req.error is None and log.is_done(i, key(i, req)):
            meta.pop(i, None)
            order.skip(i)
            return True
        return False

    out = None if single or not args.output else _Output(args.output, header, log)
    stats: dict = {}
    first_error: str | None = None

    def write(i: int, ans) -> None:
        nonlocal first_error
        n, req, digest = meta.pop(i)
        if ans.error is not None and first_error is None:
            first_error = ans.error
        png = save_attention_png(args.save_attention, i, req, ans, cfg) if args.save_attention else None
        if single:
            if ans.error is None:
                print(ans.text, flush=True)
            return
        record = {"index": i, "line": n, "image": None if req.image is None else str(req.image), "prompt": req.prompt,
                  "answer": ans.text, "error": ans.error}
        if resumable:
            record["image_sha256"] = digest
        if args.save_attention:
            record["attention"] = png
        line = json.dumps(record) + "\n"
        if out is None:
            sys.stdout.write(line)
            sys.stdout.flush()
        else:
            out.write(line)

    stream = stream_answers(params, cfg, tokenizer, requests(), options, mesh=mesh, progress=args.batch is not None, stats=stats,
                            skip=skip, stop=lambda: stop.requested)
    interrupted = None
    try:
        try:
            for i, ans in stream:
                for j, a in order.push(i, ans):
                    write(j, a)
        except KeyboardInterrupt:
            interrupted = 130
        except _WriteFailed as e:
            stream.close()  # its progress bar ends its line first
            print(f"error: {e}; the {out.written} answers written before it are kept there: free space, then run the same "
                  "command with --resume to finish", file=sys.stderr)
            return 1
        if stop.requested:
            interrupted = stop.exit_code
        if interrupted is not None:
            for j, a in order.drain():  # the answers done so far, sorted
                write(j, a)
            done = stats.get("answered", 0) + stats.get("failed", 0)
            where = ""
            if args.output:
                where = (f" to {args.output}; run again with --resume to finish" if out is not None and out.f is not None
                         else f"; {args.output} was not touched")
            print(f"interrupted: {done} items written{where}", file=sys.stderr)
            return interrupted
        if out is not None:
            out.write("")  # an input without items still gets its (header-only) file
    finally:
        stream.close()
        if out is not None:
            out.close()
    if log is not None and log.finalize():
        print(f"resumed: {args.output} merged into input order", file=sys.stderr)
    print(_stats_line(stats, cache), file=sys.stderr)
    if single and first_error is not None:
        print(f"error: {first_error}", file=sys.stderr)
        return 1
    if stats.get("failed", 0):
        print(f"{stats['failed']} of {stats['failed'] + stats.get('answered', 0)} items failed (see their 'error')", file=sys.stderr)
        if not stats.get("answered", 0):
            print("error: no item was answered", file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command's entry point (``argv`` without the command name)."""
    try:
        return _generate(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt as e:  # before the work starts (the signals then only set a flag: flexattn_jax.interrupt)
        from flexattn_jax.interrupt import exit_code

        print("\ninterrupted", file=sys.stderr)
        return exit_code(e)
