"""Every config file composes and validates; typos and bad values fail at compose / validation time."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict

from txl.config import register, to_objects
from txl.model import TransformerXL

CONF = Path(__file__).resolve().parent.parent / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
ATTENTIONS = sorted(p.stem for p in (CONF / "attention").glob("*.yaml"))
register()


def _compose(name="train", overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=name, overrides=list(overrides), return_hydra_config=True)
    from hydra.core.hydra_config import HydraConfig
    HydraConfig.instance().set_config(cfg)  # so ${hydra:...} resolves
    with open_dict(cfg):
        del cfg["hydra"]  # the app never sees this node either
    return cfg


def test_experiments_exist():
    assert {"wt103_base", "wt103_large", "enwik8_base", "enwik8_large", "text8_base"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_every_experiment_composes(exp):
    c = to_objects(_compose(overrides=[f"experiment={exp}"]))
    # the experiment's lengths reach the model through the one seq node
    assert c.model.seq.tgt_len == c.seq.tgt_len and c.model.seq.mem_len == c.seq.mem_len
    assert c.model.seq.same_length == c.seq.same_length and c.model.seq.clamp_len == c.seq.clamp_len
    # the released scripts train without same_length / clamp_len and pass them to eval.py only
    assert (c.model.seq.same_length, c.model.seq.clamp_len) == (False, -1)
    assert c.seq.eval_same_length is True and c.seq.eval_clamp_len > 0
    assert c.optim.scheduler == "original"  # the released train.py's schedule


def test_released_settings_are_the_papers():
    c = to_objects(_compose(overrides=["experiment=wt103_base"]))
    assert (c.model.n_layer, c.model.d_model, c.model.n_head, c.model.d_head, c.model.d_inner) == (16, 410, 10, 41, 2100)
    assert (c.seq.tgt_len, c.seq.mem_len, c.seq.eval_tgt_len, c.seq.eval_mem_len, c.seq.eval_clamp_len) == (150, 150, 64, 640, 400)
    assert c.model.cutoffs == [20000, 40000, 200000] and c.data.batch_size == 60 and c.trainer.max_steps == 200000
    c = to_objects(_compose(overrides=["experiment=enwik8_large"]))
    assert (c.model.n_layer, c.model.d_model, c.model.d_inner, c.seq.eval_mem_len) == (24, 1024, 3072, 3800)


@pytest.mark.parametrize("att", ATTENTIONS)
def test_every_attention_composes_and_builds(att):
    c = to_objects(_compose(overrides=[f"attention={att}", "model=tiny"]))
    from txl.budget import resolve_model  # the vocabulary is the data's: byte-level here
    TransformerXL(resolve_model(c.model, 256, "byte")[0])  # backend / pattern / kind accepted by the model too


@pytest.mark.parametrize("group", ["data", "model", "trainer", "logger"])
def test_every_group_option_composes(group):
    for p in sorted((CONF / group).glob("*.yaml")):
        over = [f"{group}={p.stem}"]
        if p.stem == "text_files":
            over += ["data.train=a", "data.valid=b", "data.test=c"]
        to_objects(_compose(overrides=over))


def test_eval_config_composes():
    c = to_objects(_compose("eval", ["ckpt_path=x.ckpt", "seq.eval_mem_len=1600", "seq.eval_same_length=true"]))
    assert c.seq.eval_mem_len == 1600 and c.seq.eval_same_length is True and c.seq.eval_tgt_len is None
    # the names before eval_clamp_len / eval_same_length still work (one release), not both at once
    c = to_objects(_compose("eval", ["ckpt_path=x.ckpt", "seq.same_length=true", "seq.clamp_len=40"]))
    assert (c.seq.eval_same_length, c.seq.eval_clamp_len) == (True, 40)
    with pytest.raises(ValueError, match="old name"):
        to_objects(_compose("eval", ["ckpt_path=x.ckpt", "seq.clamp_len=40", "seq.eval_clamp_len=30"]))


def test_one_seq_node_drives_every_length():
    c = to_objects(_compose(overrides=["seq.tgt_len=48", "seq.mem_len=96"]))
    assert (c.model.seq.tgt_len, c.model.seq.mem_len, c.seq.eval_tgt_len, c.seq.eval_mem_len) == (48, 96, 48, 96)
    assert (c.seq.eval_clamp_len, c.seq.eval_same_length) == (c.seq.clamp_len, c.seq.same_length) == (-1, False)


def test_eval_memory_follows_the_original_rule():
    # a shorter eval segment gets the difference as memory: mem + tgt - eval_tgt (the original train.py)
    c = to_objects(_compose(overrides=["seq.tgt_len=48", "seq.mem_len=96", "seq.eval_tgt_len=16"]))
    assert c.seq.eval_mem_len == 96 + 48 - 16
    c = to_objects(_compose(overrides=["seq.tgt_len=48", "seq.mem_len=96", "seq.eval_tgt_len=64"]))
    assert c.seq.eval_mem_len == 96  # a longer eval segment keeps mem_len
    c = to_objects(_compose(overrides=["seq.tgt_len=48", "seq.mem_len=96", "seq.eval_tgt_len=16", "seq.eval_mem_len=8"]))
    assert c.seq.eval_mem_len == 8  # an explicit value wins


def test_seq_defaults_are_the_models():
    """One default per length: the schema's seq node takes the model's SeqConfig defaults."""
    from dataclasses import fields

    from txl.config import SeqNode
    from txl.model.config import SeqConfig
    node, model = SeqNode(), SeqConfig()
    for f in fields(SeqConfig):
        assert getattr(node, f.name) == getattr(model, f.name), f.name


def test_cpu_trainer_validates_the_whole_split():
    c = to_objects(_compose(overrides=["trainer=cpu"]))
    assert c.trainer.limit_val_batches == 1.0 and c.trainer.test_at_end is True


@pytest.mark.parametrize("override", ["model.d_modle=3", "seq.tgt_lenn=3", "trainer.max_stepz=1", "attention=nope",
                                      "model.n_layer=abc"])
def test_typos_fail_at_compose_time(override):
    with pytest.raises(ConfigCompositionException):
        _compose(overrides=[override])


@pytest.mark.parametrize("override,needle", [
    ("seq.tgt_len=0", "tgt_len"), ("seq.mem_len=-1", "mem_len"), ("model.d_model=0", "d_model"),
    ("model.attn.backend=nope", "backend"), ("optim.name=sgdd", "optim.name"), ("data.batch_size=0", "batch_size"),
    ("model.kind=nope", "kind"), ("seq.ext_len=64", "ext_len"), ("data.tokenizer=bpe", "tokenizer"),
])
def test_bad_values_fail_before_any_work(override, needle):
    with pytest.raises(ValueError, match=needle):
        to_objects(_compose(overrides=[override]))


def test_schema_keeps_model_defaults_unresolved():
    # d_embed defaults to d_model *per size*, not to the schema's default size
    c = to_objects(_compose(overrides=["model=base"]))
    assert c.model.d_embed == 410
    with pytest.raises(ValueError, match="data.train"):
        to_objects(_compose(overrides=["data=text_files"]))
