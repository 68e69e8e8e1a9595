"""Stand-ins for the helper modules that transformers' common tests import but its sdist does not ship (see
test_hf_common.py). Written for this project; they are importable by name so that the worker processes of the
distributed tests can load them too."""

import os
import socket
import types

import torch


class ExportTesterMixin:
    """Stand-in for tests/exporters/test_export.py: torch.export of the model is not part of these checks."""


class GenerationTesterMixin:
    """Stand-in for tests/generation/test_utils.py: transformers' generation tests drive autoregressive
    `generate()`; ours is masked diffusion (tested in modeling_tests/test_generation.py)."""


# Stand-in for tests/utils/test_configuration_utils.py: common PreTrainedConfig arguments, each set to a value other
# than its default; ConfigTester checks that a config keeps every one of them.
config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "tie_word_embeddings": True,
    "is_encoder_decoder": False,
    "chunk_size_feed_forward": 5,
    "architectures": ["LLaDAMoEForDiffusionLM"],
    "finetuning_task": "sorting",
    "id2label": {0: "first", 1: "second"},
    "label2id": {"first": 0, "second": 1},
    "tokenizer_class": "PreTrainedTokenizerFast",
    "prefix": "answer:",
    "bos_token_id": 6,
    "pad_token_id": 7,
    "eos_token_id": 8,
    "sep_token_id": 9,
    "decoder_start_token_id": 10,
    "problem_type": "single_label_classification",
}


def run_distributed(world_size: int):
    """Stand-in for tests/distributed_testing_utils.py: `run_distributed(world_size)(fn)(*args)` runs
    fn(rank, *args) in `world_size` spawned CPU processes joined by a gloo process group; a failing process fails
    the call."""

    def decorate(fn):
        def launch(*args):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            # fork: the workers start with everything imported (a spawned worker spends seconds importing torch and
            # transformers again); the tests run on one intra-op thread (conftest), which keeps fork safe, and
            # each worker renews torch's thread pool first (_after_fork).
            torch.multiprocessing.start_processes(_entry, args=(world_size, port, fn, args), nprocs=world_size,
                                                  join=True, start_method="fork")

        return launch

    return decorate


def _after_fork():
    """Renew torch's intra-op thread pool in a forked worker while it has one thread. After a fork torch replaces
    the pool the parent had (its threads are gone) at the next use, and that replacement races: a thread that
    asks while another one replaces it gets none ("pool INTERNAL ASSERT FAILED ... Invalid thread pool!"). Once
    the parent has called torch.set_num_threads (conftest does), every new thread asks at its first parallel
    operation, and transformers loads weights on several threads at once."""
    torch.set_num_threads(torch.get_num_threads())


def _entry(rank, world_size, port, fn, args):
    import torch.distributed as dist

    _after_fork()

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def _forked(rank, fn, *args):
    _after_fork()
    return fn(rank, *args)


def _spawn_by_fork(fn, args=(), nprocs=1, join=True, daemon=False, start_method="spawn"):
    return torch.multiprocessing.start_processes(_forked, args=(fn, *args), nprocs=nprocs, join=join,
                                                 daemon=daemon, start_method="fork")


# torch.multiprocessing whose spawn() forks: for the transformers versions whose mixins call mp.spawn themselves.
fork_multiprocessing = types.SimpleNamespace(spawn=_spawn_by_fork)
