"""launch.tpu_run's checks before anything is written: each bad input is one line on stderr that
names the field, no traceback, and no workdir; and the tokenizer's placeholder default."""

import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (override, what stderr must say). Run on the tiny config with one CPU device.
BAD_INPUTS = [
    ("--config.mesh.tensor=3",
     "config: mesh {'data': 1, 'fsdp': -1, 'tensor': 3} on 1 cpu device(s): 1 devices are not divisible"),
    ("--config.tokenizer=/nonexistent", "config: tokenizer '/nonexistent': no such folder"),
    ("--config.loop2.train.lora_targets=q,zz",
     "config: loop2.train.lora_targets 'q,zz': unknown projection 'zz'; expected one of ['ALL', 'ATTN', 'MLP', "
     "'QV'] or a comma-separated list of ['q', 'k', 'v', 'o', 'gate', 'up', 'down']"),
    ("--config.inference.max_len=10",
     "config: inference.max_len 10 is too short: the first craftax prompt takes at least"),
    ("--config.no_such=1", "config: unknown field no_such ("),
    ("--config.loop1.revisionz=2", "config: unknown field loop1.revisionz (did you mean loop1.revisions?)"),
    ("--config.env.structure=/nope.yaml", "config: env.structure '/nope.yaml': not found"),
    ("--config.model.checkpoint=gs://YOUR_BUCKET/models/m",
     "config: model.checkpoint 'gs://YOUR_BUCKET/models/m' is a placeholder"),
    ("--config.eval.heldout_seeds=48-51", "config: eval.heldout_seeds '48-51' overlap eval.seeds at [48, 49]"),
]


def test_bad_inputs_stop_before_the_workdir_with_one_line(tmp_path):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    procs = []
    for i, (flag, _) in enumerate(BAD_INPUTS):  # all at once: each spends seconds importing jax
        wd = tmp_path / f"run{i}"
        procs.append((wd, subprocess.Popen(
            [sys.executable, "-m", "launch.tpu_run", "--config=configs/tiny.py", f"--workdir={wd}", flag],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for (flag, msg), (wd, p) in zip(BAD_INPUTS, procs):
        _, err = p.communicate(timeout=600)
        assert p.returncode != 0, flag
        assert msg in err, (flag, err[-2000:])
        assert "Traceback" not in err and len(err.strip().splitlines()) < 5, (flag, err[-2000:])
        assert not wd.exists(), flag


def test_max_len_message_gives_both_numbers():
    from absl import app

    from launch import tpu_run
    c = importlib.import_module("configs.tiny").get_config()
    c.inference.max_len = 300
    with pytest.raises(app.UsageError, match=r"inference\.max_len 300 is too short: .* at least (\d+) tokens "
                                             r"\(empty observation and memory\) \+ inference\.max_tokens 160 = \d+"):
        tpu_run.validate_config(c, c.stages.split(","))
    c.inference.max_len = 2048  # the default fits
    tpu_run.validate_config(c, c.stages.split(","))


def test_tokenizer_placeholder_defaults_to_the_checkpoint():
    from automem_jax.models.tokenizer import is_placeholder, tokenizer_source
    ph = "gs://YOUR_BUCKET/models/Qwen2.5-32B-Instruct"
    assert is_placeholder(ph) and not is_placeholder("gs://my-bucket/models/Qwen") and not is_placeholder("")
    assert tokenizer_source(ph, "gs://b/models/q") == "gs://b/models/q"
    assert tokenizer_source("", "/ckpt") == "/ckpt"
    assert tokenizer_source("/tok", "/ckpt") == "/tok"
    assert tokenizer_source(ph, "") is None and tokenizer_source("", None) is None  # the offline Qwen3 files
    for name in ("crafter_qwen25_32b", "minihack_qwen25_7b"):  # the pod configs hold the placeholder
        c = importlib.import_module(f"configs.{name}").get_config()
        assert is_placeholder(c.tokenizer)
        assert tokenizer_source(c.tokenizer, "/real/ckpt") == "/real/ckpt"


def test_validation_reads_the_defaulted_tokenizer(tmp_path, monkeypatch):
    """A pod config given only --config.model.checkpoint: the tokenizer placeholder resolves to that
    folder, which must hold a tokenizer whose vocabulary fits the model's."""
    from absl import app

    from automem_jax.models import qwen_presets
    from automem_jax.models.tokenizer import default_tokenizer_dir
    from launch import tpu_run
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-key")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(qwen_presets.preset("qwen2.5-32b").to_hf()))
    c = importlib.import_module("configs.crafter_qwen25_32b").get_config()
    c.model.checkpoint = str(ckpt)
    c.critic.base_url, c.critic.model = "https://critic.example.com/v1", "some-model"
    stages = c.stages.split(",")
    with pytest.raises(app.UsageError, match="tokenizer .defaulting to model.checkpoint. '.*ckpt': holds no tokenizer"):
        tpu_run.validate_config(c, stages)
    for name in os.listdir(default_tokenizer_dir()):
        shutil.copy(os.path.join(default_tokenizer_dir(), name), ckpt / name)
    tpu_run.validate_config(c, stages)
    # A model whose embedding is smaller than the tokenizer's vocabulary.
    (ckpt / "config.json").write_text(json.dumps({**qwen_presets.preset("qwen2.5-32b").to_hf(), "vocab_size": 512}))
    with pytest.raises(app.UsageError, match="tokens, more than the model's vocab_size 512"):
        tpu_run.validate_config(c, stages)


def test_placeholder_critic_is_refused():
    from absl import app

    from launch import tpu_run
    c = importlib.import_module("configs.crafter_qwen25_32b").get_config()
    c.model.checkpoint = ""
    with pytest.raises(app.UsageError, match="critic.base_url 'https://YOUR_CRITIC_ENDPOINT/v1' is a placeholder"):
        tpu_run.validate_config(c, c.stages.split(","))


def test_heldout_seeds_and_loop2_choices_are_checked_before_anything_runs():
    from absl import app

    from launch import config as ph
    from launch import tpu_run

    def bad(match, **sets):
        c = importlib.import_module("configs.tiny").get_config()
        for dotted, value in sets.items():
            sec, key = dotted.split("__")
            c[sec][key] = value
        with pytest.raises(app.UsageError, match=match):
            tpu_run.validate_config(c, c.stages.split(","))

    c = importlib.import_module("configs.tiny").get_config()
    first_collect = ph.collect_seeds(c.collect.episodes, c.collect.seed_base, ph.parse_seeds(c.eval.seeds))[0]
    bad(rf"eval.heldout_seeds '50,{first_collect}' overlap collect seeds at \[{first_collect}\]",
        eval__heldout_seeds=f"50,{first_collect}")
    bad(r"eval.heldout_seeds '99-100' overlap bootstrap.seeds at \[100\]", eval__heldout_seeds="99-100")
    bad(r"eval.heldout_seeds: seed list '5-x'", eval__heldout_seeds="5-x")
    bad(r"loop2.max_examples 5 is below loop2.min_examples 20", loop2__max_examples=5)
    bad(r"loop2.max_examples -1: expected an integer >= 0", loop2__max_examples=-1)
    bad(r"env.text_style 'plain': expected one of balrog, exact", env__text_style="plain")
    bad(r"env.extra_commands: unknown extra_commands \['fly'\]", env__extra_commands="travel,fly")
    c = importlib.import_module("configs.tiny").get_config()
    c.loop2.decider.lora_ranks = "8,32"
    with pytest.raises(app.UsageError, match=r"loop2.decider.lora_ranks \[32\] exceed loop2.train.lora_rank 16"):
        tpu_run.validate_config(c, c.stages.split(","))
    c.loop2.decider.lora_ranks = "8"
    c.loop2.decider.lr_scales = "0,1"
    with pytest.raises(app.UsageError, match=r"loop2.decider: decider lr_scales must all be > 0"):
        tpu_run.validate_config(c, c.stages.split(","))


def test_paper_configs_hold_out_seeds_disjoint_from_eval_and_collect():
    from launch import config as ph
    for name in ("crafter_qwen25_32b", "crafter_qwen25_7b", "crafter_qwen25_05b", "minihack_qwen25_32b",
                 "nethack_qwen25_32b", "minihack_qwen25_7b", "nethack_qwen25_7b", "tiny"):
        c = importlib.import_module(f"configs.{name}").get_config()
        held = set(ph.parse_seeds(c.eval.heldout_seeds))
        evals = ph.parse_seeds(c.eval.seeds)
        assert held and not held & set(evals), name
        assert not held & set(ph.collect_seeds(c.collect.episodes, c.collect.seed_base, evals)), name
        assert name == "tiny" or not held & set(range(42, 52)), name  # disjoint from the 42-51 eval seeds too
        assert c.loop2.decider.enabled and c.loop2.max_examples >= c.loop2.min_examples, name
