"""One forward of LLaDA-MoE on the CPU: this package (`auto`, the default) against llama.cpp on the same weights,
interleaved in one process (issue 13: "at least as fast as ggml's").

The model is benchmarks/forward.py's random model ("mid": 4 layers, hidden 512, 64 experts of width 256, top-8,
vocab 4096; "release": the release's widths, 2 layers, vocab 4096), written as a GGUF file (arch `llada-moe`,
no tokenizer: token ids go in directly) with the `gguf` package, and run through llama.cpp's C API (the ctypes
bindings of llama-cpp-python) as its diffusion example runs a denoising step: a batch of all positions, non-causal
attention, logits for every position, flash attention off. Per shape, dtype, token count and thread count:
llama.cpp's repetitions (`llama_decode`) back to back, a pause, then auto and grouped_mm in a new random order
each repetition, back to back; the two phases alternate --rounds times, and the medians are over all. The
table gives median ms and `ours x` = llama.cpp time / auto time (above 1: ours is faster). Each row also records
max |logits(llama.cpp) - logits(eager)|, so a fast but wrong llama.cpp (or a wrong export) shows.

llama-cpp-python and gguf are not dependencies of the package; build llama.cpp for this CPU:

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python gguf
    python benchmarks/llama_cpp_forward.py --out /tmp/llama_cpp_forward.json

Prints a table and writes JSON (machine, versions, git commit, llama.cpp's system info, shapes, timings) to
--out; nothing is written without it.
"""

import argparse
import importlib
import importlib.util
import multiprocessing
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from importlib import metadata

import numpy as np
import torch
import transformers

from cpu_experts import model_shape
from forward import build_models
from provenance import git_state, write_json


IMPLEMENTATIONS = ("llama.cpp", "auto", "grouped_mm")
# A pause after llama.cpp's repetitions, before ours (see time_row). Within each phase the calls run back to back,
# as generation runs its forwards: a pause before each of ours (20 ms, as this script did before) slowed our
# 2-thread forwards of 16 tokens up to 2x (torch's OpenMP team asleep), while llama.cpp's ran back to back.
PHASE_PAUSE_S = 2.0


def _bindings(llama=True):
    """The gguf package and (in the worker) llama-cpp-python's bindings, or a clear exit."""
    try:
        import gguf

        if importlib.util.find_spec("llama_cpp") is None:
            raise ImportError("No module named 'llama_cpp'", name="llama_cpp")
        llama_cpp = importlib.import_module("llama_cpp") if llama else None
    except ImportError as error:
        sys.exit(
            f"error: {error.name} is not installed. This benchmark needs llama-cpp-python and gguf, built for this "
            'CPU:\n  CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python gguf'
        )
    return gguf, llama_cpp


def export_gguf(model, path: str, dtype: torch.dtype) -> None:
    """Write MODEL as a llama.cpp `llada-moe` GGUF: the names and hyperparameters llama.cpp's converter writes for
    inclusionAI/LLaDA-MoE-7B-A1B (conversion/llada.py there), the experts as three [experts, out, in] tensors.
    No tokenizer ("none" with the vocabulary's size): the benchmark feeds token ids."""
    gguf, _ = _bindings(llama=False)
    config = model.config
    writer = gguf.GGUFWriter(path, "llada-moe")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.expert_intermediate_size * config.num_experts_per_tok)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_feed_forward_length(config.expert_intermediate_size)
    writer.add_causal_attention(False)
    writer.add_tokenizer_model("none")
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == torch.float32 else gguf.LlamaFileType.MOSTLY_BF16)

    def add(name, tensor, keep_f32=False):
        tensor = tensor.detach().contiguous()
        if keep_f32 or dtype == torch.float32:  # norms stay float32, as the converter writes them
            writer.add_tensor(name, tensor.float().numpy())
        else:
            # gguf takes raw bytes with their byte shape (the last dimension twice as long for bfloat16)
            raw = tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
            writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType.BF16)

    add("token_embd.weight", model.model.embed_tokens.weight)
    add("output_norm.weight", model.model.norm.weight, keep_f32=True)
    add("output.weight", model.lm_head.weight)
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        add(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight, keep_f32=True)
        add(f"blk.{i}.attn_q.weight", attn.q_proj.weight)
        add(f"blk.{i}.attn_k.weight", attn.k_proj.weight)
        add(f"blk.{i}.attn_v.weight", attn.v_proj.weight)
        add(f"blk.{i}.attn_output.weight", attn.o_proj.weight)
        add(f"blk.{i}.attn_q_norm.weight", attn.q_norm.weight, keep_f32=True)
        add(f"blk.{i}.attn_k_norm.weight", attn.k_norm.weight, keep_f32=True)
        add(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight, keep_f32=True)
        add(f"blk.{i}.ffn_gate_inp.weight", mlp.gate.weight, keep_f32=True)
        intermediate = mlp.experts.down_proj.shape[-1]
        gate_up = mlp.experts.gate_up_proj  # [experts, gate rows then up rows, hidden]
        add(f"blk.{i}.ffn_gate_exps.weight", gate_up[:, :intermediate])
        add(f"blk.{i}.ffn_up_exps.weight", gate_up[:, intermediate:])
        add(f"blk.{i}.ffn_down_exps.weight", mlp.experts.down_proj)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


class LlamaCppForward:
    """A llama.cpp model and context for one-batch forwards of `tokens` positions (no KV cache: llada-moe has none).
    Lives in the worker process (`_worker`)."""

    def __init__(self, path: str, tokens: int, vocab: int):
        _, self.lib = _bindings()
        lib = self.lib
        self._log = lib.llama_log_callback(_log_errors)  # kept: llama.cpp calls it for as long as it runs
        lib.llama_log_set(self._log, None)
        lib.llama_backend_init()
        self.model = lib.llama_model_load_from_file(path.encode(), lib.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = lib.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = tokens
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        lib.llama_set_causal_attn(self.ctx, False)
        self.tokens, self.vocab = tokens, vocab
        self.batch = lib.llama_batch_init(tokens, 0, 1)

    def set_threads(self, threads: int) -> None:
        self.lib.llama_set_n_threads(self.ctx, threads, threads)

    def run(self, ids: list[int]) -> float:
        """One forward (the batch filled, then llama_decode); returns its seconds."""
        start = time.perf_counter()
        batch = self.batch
        batch.n_tokens = self.tokens
        for i, token in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, 1
            batch.seq_id[i][0] = 0
        status = self.lib.llama_decode(self.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        return time.perf_counter() - start

    def logits(self) -> np.ndarray:
        pointer = self.lib.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(pointer, (self.tokens, self.vocab)).copy()

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


def _log_errors(level, text, user_data):
    if level == 4:  # GGML_LOG_LEVEL_ERROR: the rest (loading, graph) would bury the table
        sys.stderr.write(text.decode(errors="replace"))


def _worker(conn, path, tokens, vocab):
    """The llama.cpp side, in a process of its own: its OpenMP threads and torch's (one libgomp in a process) would
    otherwise share a runtime, and a 2-thread run of one slowed the other's next runs by up to 2x here."""
    llama = LlamaCppForward(path, tokens, vocab)
    conn.send(system_info())
    while True:
        command, arg = conn.recv()
        if command == "threads":
            llama.set_threads(arg)
            conn.send(None)
        elif command == "run":
            conn.send(llama.run(arg))
        elif command == "logits":
            llama.run(arg)
            conn.send(llama.logits())
        else:
            llama.close()
            conn.send(None)
            return


class LlamaCppProcess:
    """LlamaCppForward in a worker process; the parent waits on a pipe (asleep) while it runs."""

    def __init__(self, path: str, tokens: int, vocab: int):
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child, path, tokens, vocab), daemon=True)
        self.process.start()
        self.system_info = self._receive()

    def _receive(self):
        deadline = time.monotonic() + 600
        while not self.conn.poll(1):  # a worker that died (a model llama.cpp cannot load) is reported at once
            if not self.process.is_alive():
                raise RuntimeError(f"the llama.cpp worker died (exit code {self.process.exitcode}); see above")
            if time.monotonic() > deadline:
                raise RuntimeError("the llama.cpp worker did not answer within 10 minutes")
        return self.conn.recv()

    def ask(self, command, arg=None):
        self.conn.send((command, arg))
        return self._receive()

    def close(self):
        if self.process.is_alive():
            self.ask("close")
        self.process.join(30)


def system_info() -> str:
    _, lib = _bindings()
    return lib.llama_print_system_info().decode(errors="replace").strip()


def ours(model, ids, impl):
    model.set_experts_implementation(impl)
    return model(ids)


def timed_ours(model, ids, impl) -> float:
    start = time.perf_counter()
    ours(model, ids, impl)
    return time.perf_counter() - start


def time_row(model, llama, ids, reps, rounds):
    """Median ms of each implementation. llama.cpp's repetitions come first, back to back, then ours (auto and
    grouped_mm in a new random order each repetition, back to back: both run on torch's OpenMP team) after a
    pause: right after a llama.cpp run on the same cores (in its process), our 2-thread lanes (then on Python
    workers) ran up to 3x slower for a second or more here, though llama.cpp's threads were idle (0.01 s of CPU in
    2 s) and torch alone showed nothing of the kind; grouped_mm was not affected. The two phases alternate `rounds`
    times (each with `reps` repetitions) and the medians are over all of them: on this shared machine a phase
    could run 2x slower than the next one for no reason of its own."""
    token_list = ids[0].tolist()
    run = {
        "auto": lambda: timed_ours(model, ids, "auto"),
        "grouped_mm": lambda: timed_ours(model, ids, "grouped_mm"),
    }
    samples = {impl: [] for impl in IMPLEMENTATIONS}
    for _ in range(rounds):
        llama.ask("run", token_list)  # warm-up
        samples["llama.cpp"] += [llama.ask("run", token_list) for _ in range(reps)]
        time.sleep(PHASE_PAUSE_S)
        with torch.no_grad():
            for impl in run:  # warm-up: buffers, torch's threads
                run[impl]()
            for _ in range(reps):
                order = list(run)
                random.shuffle(order)
                for impl in order:
                    samples[impl].append(run[impl]())
    return {impl: 1e3 * statistics.median(samples[impl]) for impl in IMPLEMENTATIONS}


def logits_error(model, llama, ids) -> float:
    with torch.no_grad():
        eager = ours(model, ids, "eager").logits[0].float()
    return (torch.from_numpy(llama.ask("logits", ids[0].tolist())) - eager).abs().max().item()


def measure(shape_names, dtypes, token_counts, thread_counts, reps, rounds, workdir):
    rows = []
    for shape_name in shape_names:
        dims = model_shape(shape_name)
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            torch.manual_seed(0)
            model, olmoe = build_models(dims, "cpu", dtype)
            del olmoe
            path = os.path.join(workdir, f"{shape_name}-{dtype_name}.gguf")
            start = time.perf_counter()
            export_gguf(model, path, dtype)
            print(f"# wrote {shape_name} {dtype_name} GGUF in {time.perf_counter() - start:.1f} s", flush=True)
            for tokens in token_counts:
                llama = LlamaCppProcess(path, tokens, dims["vocab"])
                info = llama.system_info
                ids = torch.randint(3, dims["vocab"], (1, tokens))
                error = logits_error(model, llama, ids)
                for threads in thread_counts:
                    torch.set_num_threads(threads)
                    llama.ask("threads", threads)
                    ms = time_row(model, llama, ids, reps, rounds)
                    row = {
                        "shape": shape_name, "dtype": dtype_name, "tokens": tokens, "threads": threads,
                        "median_ms": ms, "llama_cpp_over_auto": ms["llama.cpp"] / ms["auto"],
                        "speedup_vs_grouped_mm": {impl: ms["grouped_mm"] / ms[impl] for impl in ms},
                        "max_abs_logits_llama_cpp_vs_eager": error, "llama_cpp_system_info": info,
                    }  # fmt: skip
                    rows.append(row)
                    print_row(row)
                llama.close()
            os.remove(path)
            del model
    return rows


def print_header():
    print("forward, batch 1: median ms; ours x = llama.cpp time / auto time; x gmm = grouped_mm time / time")
    print(f"{'shape':<7} {'dtype':<8} {'tok':>4} {'thr':>3} | {'llama':>7} {'auto':>7} {'gmm':>7} | "
          f"{'ours x':>6} {'llama x':>7} {'auto x':>6} | {'err':>7}")  # fmt: skip


def print_row(row):
    ms, speed = row["median_ms"], row["speedup_vs_grouped_mm"]
    print(f"{row['shape']:<7} {row['dtype']:<8} {row['tokens']:>4} {row['threads']:>3} | "
          f"{ms['llama.cpp']:>7.1f} {ms['auto']:>7.1f} {ms['grouped_mm']:>7.1f} | "
          f"{row['llama_cpp_over_auto']:>6.2f} {speed['llama.cpp']:>7.2f} {speed['auto']:>6.2f} | "
          f"{row['max_abs_logits_llama_cpp_vs_eager']:>7.1e}", flush=True)  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["mid"], choices=["mid", "release"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[16, 32, 96, 256])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--reps", type=int, default=5, help="repetitions of each implementation per round")
    parser.add_argument("--rounds", type=int, default=3, help="llama.cpp's phase and ours, alternated this often")
    parser.add_argument("--out", help="JSON file for the results (none if unset)")
    args = parser.parse_args(argv)
    if min(args.tokens) < 1 or min(args.threads) < 1 or args.reps < 1 or args.rounds < 1:
        parser.error("--tokens, --threads, --reps and --rounds must be at least 1")
    _bindings(llama=False)  # the parent writes GGUF files; llama.cpp itself is loaded in the worker only
    print_header()
    with tempfile.TemporaryDirectory(prefix="llama-cpp-forward-") as workdir:  # GGUF files: removed however it ends
        rows = measure(args.shapes, args.dtypes, args.tokens, args.threads, args.reps, args.rounds, workdir)
    report = {
        "benchmark": "llama_cpp_forward",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "llama_cpp_python": metadata.version("llama_cpp_python"), "gguf": metadata.version("gguf"),
                     "python": platform.python_version()},  # fmt: skip
        "git": git_state(),
        "reps": args.reps,
        "rounds": args.rounds,
        "shapes": {name: model_shape(name) for name in args.shapes},
        "rows": rows,
    }
    write_json(report, args.out)


if __name__ == "__main__":
    main()
