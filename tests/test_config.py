import pytest

from loravl.config import ConfigError, RunConfig, load_config, main_config, parse_overrides


def test_defaults_are_the_recipe():
    cfg = RunConfig().validate()
    lora = cfg.model.vision.lora
    assert (lora.rank, lora.alpha, lora.dropout, lora.target_modules) == (16, 32, 0.1, ["query", "value"])
    assert cfg.model.compressor.hidden_dim == 384 and cfg.model.compressor.embed_dim == 128
    assert cfg.train.lora_warmup_epochs == 5 and cfg.train.lora_lr == 2e-4


def test_yaml_then_dotted_and_flat_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  vision:\n    lora:\n      rank: 8\ntrain:\n  batch_size: 16\n")
    cfg = load_config(path, ["--model.vision.lora.rank", "32", "--batch_size", "64", "--use_ddp", "True",
                             "--num_gpus=8", "--lora.target_modules", "q_proj,v_proj"])
    assert cfg.model.vision.lora.rank == 32
    assert cfg.train.batch_size == 64 and cfg.train.use_ddp is True and cfg.train.num_gpus == 8
    assert cfg.model.vision.lora.target_modules == ["q_proj", "v_proj"]


def test_unknown_key_names_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  vision:\n    lora:\n      rnak: 8\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*'model.vision.lora.rnak'"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown config option --batchsize"):
        load_config(None, ["--batchsize", "3"])


def test_wrong_type_and_impossible_value_name_the_field():
    with pytest.raises(ConfigError, match=r"train.batch_size must be an integer"):
        load_config(None, ["--batch_size", "many"])
    with pytest.raises(ConfigError, match=r"model.vision.lora.rank must be > 0"):
        load_config(None, ["--model.vision.lora.rank", "0"])
    with pytest.raises(ConfigError, match=r"model.loss.itm_negatives must be"):
        load_config(None, ["--itm_negatives", "random"])
    with pytest.raises(ConfigError, match=r"model.loss.image_pooling_heads must divide the image token width"):
        load_config(None, ["--image_pooling", "attention", "--image_pooling_heads", "3"])
    with pytest.raises(ConfigError, match=r"train.compile.mode must be one of default, reduce-overhead"):
        load_config(None, ["--compile_mode", "fast"])
    with pytest.raises(ConfigError, match=r"train.compile.scope must be 'forward' or 'modules'"):
        load_config(None, ["--compile_scope", "step"])
    assert load_config(None, ["--num_workers", "auto"]).data.num_workers == "auto"
    assert load_config(None, ["--num_workers", "6"]).data.num_workers == 6
    for bad in ("many", "-1"):
        with pytest.raises(ConfigError, match=r"data.num_workers must be an integer >= 0 or auto"):
            load_config(None, ["--num_workers", bad])


def test_ambiguous_flat_flag_lists_the_choices():
    with pytest.raises(ConfigError, match=r"ambiguous option --dropout.*--model.vision.lora.dropout"):
        parse_overrides(["--dropout", "0.2"])


def test_entry_point_exits_with_the_message(capsys):
    with pytest.raises(SystemExit) as exc:
        main_config(["--config", "does/not/exist.yaml"])
    assert exc.value.code == 2
    assert "config file not found: does/not/exist.yaml" in capsys.readouterr().err


def test_sections_and_the_flat_names_they_replaced(tmp_path):
    """train.compile/checkpoint/logging/profile are sections; the flat names of earlier releases still work in YAML
    (a saved checkpoint's config.yaml too), dotted or flat on the command line, and the new place wins."""
    old = tmp_path / "old.yaml"
    old.write_text("train:\n  compile: true\n  compile_mode: reduce-overhead\n  log_every: 7\n"
                   "  checkpoint_dir: ck\n  keep_last: 2\n  profile_dir: prof\n")
    cfg = load_config(old, ["--train.compile_scope", "modules", "--save_every", "5", "--log_dir", "lg",
                            "--train.checkpoint.keep_last", "4"])
    tc = cfg.train
    assert (tc.compile.enabled, tc.compile.mode, tc.compile.scope) == (True, "reduce-overhead", "modules")
    assert (tc.logging.every, tc.logging.dir, tc.profile.dir) == (7, "lg", "prof")
    assert (tc.checkpoint.dir, tc.checkpoint.save_every, tc.checkpoint.keep_last) == ("ck", 5, 4)
    new = tmp_path / "new.yaml"
    new.write_text("train:\n  compile: {enabled: true, mode: max-autotune}\n  logging: {every: 3}\n")
    cfg = load_config(new, ["--compile", "false"])
    assert (cfg.train.compile.enabled, cfg.train.compile.mode, cfg.train.logging.every) == (False, "max-autotune", 3)
    with pytest.raises(ConfigError, match=r"train.logging.every must be > 0"):
        load_config(None, ["--log_every", "0"])


def test_errors_say_where_the_value_came_from_and_suggest_the_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  batch_size: 16\n")
    with pytest.raises(ConfigError, match=r"^on the command line: train.batch_size must be > 0"):
        load_config(path, ["--batch_size", "0"])
    path.write_text("train:\n  batch_size: 0\n")
    with pytest.raises(ConfigError, match=r"run.yaml: train.batch_size must be > 0"):
        load_config(path, ["--lr", "0.1"])
    path.write_text("train:\n  batch_sise: 16\n")
    with pytest.raises(ConfigError, match=r"run.yaml: unknown config key 'train.batch_sise'; did you mean batch_size\?"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown config option --lora_warmup_epoch; did you mean "
                                          r"--lora_warmup_epochs[ ?]"):
        load_config(None, ["--lora_warmup_epoch", "2"])


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as exc:
        main_config(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--train.checkpoint.save_every" in out and "default 1000" in out
    assert "--model.vision.lora.rank" in out and "\ntrain.compile:" in out
