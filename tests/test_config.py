"""Config loading: grouped and flat LLaMA-Factory YAML, strict keys and types, overrides."""

from __future__ import annotations

import logging
import textwrap

import pytest

from tunepipe.config.loader import load_config
from tunepipe.errors import TunepipeError

LF_EXAMPLE = textwrap.dedent("""\
    ### model
    model_name_or_path: {model}
    ### method
    stage: sft
    do_train: true
    finetuning_type: lora
    lora_target: all
    lora_rank: 32
    ### dataset
    dataset: nopm_writing, dirty_writing
    template: qwen
    cutoff_len: 4096
    # max_samples: 1000
    overwrite_cache: true
    preprocessing_num_workers: 16
    ### output
    output_dir: saves/qwen2.5-14b/lora/sft-write
    logging_steps: 1
    save_steps: 200
    plot_loss: true
    # overwrite_output_dir: true
    restore_callback_states_from_checkpoint: true
    save_total_limit: 5
    ### train
    per_device_train_batch_size: 1
    gradient_accumulation_steps: 32
    max_grad_norm: 1.0
    learning_rate: 2.0e-5
    num_train_epochs: 1
    lr_scheduler_type: cosine
    warmup_ratio: 0.1
    fp16: true
    upcast_layernorm: false
    ddp_find_unused_parameters: false
    ddp_timeout: 180000000
    ### eval
    val_size: 0.1
    per_device_eval_batch_size: 1
    eval_strategy: steps
    eval_steps: 200
    """)


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_defaults_load_without_a_file():
    cfg = load_config(None)
    assert cfg.model.model_name_or_path == "smollm2-135m-instruct"
    assert cfg.train.alpha == 2 * cfg.train.lora_rank


def test_repo_params_yaml_loads():
    from tests.conftest import REPO

    cfg = load_config(REPO / "params.yaml")
    assert cfg.train.stage == "sft" and cfg.data.datasets()


def test_llamafactory_flat_example_maps_into_groups(tmp_path, caplog):
    path = write(tmp_path, LF_EXAMPLE.format(model="/models/qwen"))
    with caplog.at_level(logging.WARNING):
        cfg = load_config(path)
    assert cfg.model.model_name_or_path == "/models/qwen"
    assert cfg.train.lora_rank == 32 and cfg.train.alpha == 64
    assert cfg.data.datasets() == ["nopm_writing", "dirty_writing"]
    assert cfg.data.template == "qwen" and cfg.data.cutoff_len == 4096
    assert cfg.train.learning_rate == pytest.approx(2e-5)
    assert cfg.train.num_train_epochs == 1.0 and isinstance(cfg.train.num_train_epochs, float)
    assert cfg.train.fp16 is True and cfg.train.eval_steps == 200
    assert cfg.data.val_size == pytest.approx(0.1)
    assert cfg.train.output_dir == "saves/qwen2.5-14b/lora/sft-write"
    warned = caplog.text
    for key in ("ddp_timeout", "overwrite_cache", "upcast_layernorm"):
        assert key in warned
    assert cfg.data.preprocessing_num_workers == 16 and "preprocessing_num_workers" not in warned


def test_merge_yaml_loads(tmp_path):
    path = write(tmp_path, """\
        model_name_or_path: /models/base
        adapter_name_or_path: saves/a, saves/b
        template: qwen
        export_dir: out/merged
        export_size: 2
        export_device: cpu
        export_legacy_format: false
        """)
    cfg = load_config(path)
    assert cfg.model.adapters() == ["saves/a", "saves/b"]
    assert cfg.export.export_size == 2 and cfg.export.export_dir == "out/merged"


def test_unknown_key_suggests_closest(tmp_path):
    path = write(tmp_path, "train:\n  lora_rnk: 8\n")
    with pytest.raises(TunepipeError, match=r"train\.lora_rnk.*group 'train'.*did you mean lora_rank\?"):
        load_config(path)


def test_unknown_flat_key_suggests_closest(tmp_path):
    path = write(tmp_path, "learning_rat: 1.0e-4\n")
    with pytest.raises(TunepipeError, match=r"learning_rat.*did you mean learning_rate\?"):
        load_config(path)


def test_key_in_wrong_group_names_the_right_one(tmp_path):
    path = write(tmp_path, "data:\n  lora_rank: 8\n")
    with pytest.raises(TunepipeError, match=r"train\.lora_rank"):
        load_config(path)


def test_unsupported_llamafactory_keys_are_all_listed(tmp_path):
    path = write(tmp_path, "ray_storage_filesystem: s3\nkt_optimize_rule: x\nlora_rank: 4\nreward_model: x\n")
    with pytest.raises(TunepipeError) as err:
        load_config(path)
    message = str(err.value)
    for key in ("ray_storage_filesystem", "kt_optimize_rule", "reward_model"):
        assert key in message


@pytest.mark.parametrize("text, pattern", [
    ("train:\n  lora_rank: eight\n", r"train\.lora_rank='eight': expected an integer"),
    ("train:\n  learning_rate: fast\n", r"train\.learning_rate='fast': expected a number"),
    ("train:\n  lora_rank: 0\n", r"train\.lora_rank=0: must be >= 1"),
    ("train:\n  finetuning_type: qlora\n", r"train\.finetuning_type='qlora': must be one of"),
    ("data:\n  val_size: -0.5\n", r"data\.val_size=-0.5"),
    ("train:\n  plot_loss: 'yes'\n", r"train\.plot_loss='yes': expected true or false"),
    ("export:\n  export_legacy_format: true\n", r"safetensors only"),
])
def test_wrong_type_or_range_names_key_and_value(tmp_path, text, pattern):
    with pytest.raises(TunepipeError, match=pattern):
        load_config(write(tmp_path, text))


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    cfg = load_config(write(tmp_path, "learning_rate: 1e-4\n"))
    assert cfg.train.learning_rate == pytest.approx(1e-4)


def test_unquoted_no_as_dvc_exp_run_writes_it_is_the_string_no(tmp_path):
    # `dvc exp run -S` rewrites params.yaml as YAML 1.2, turning "no" into a bare no,
    # which YAML 1.1 (PyYAML) reads as false; eval_strategy must still load as "no".
    cfg = load_config(write(tmp_path, "train:\n  eval_strategy: no\n"), ["eval_strategy=no"])
    assert cfg.train.eval_strategy == "no"
    with pytest.raises(TunepipeError, match="eval_strategy"):
        load_config(write(tmp_path, "train:\n  eval_strategy: yes\n"))


def test_overrides_flat_and_grouped_with_checks(tmp_path):
    path = write(tmp_path, "train:\n  lora_rank: 8\n")
    cfg = load_config(path, ["lora_rank=16", "train.learning_rate=3e-4", "data.dataset=a,b"])
    assert cfg.train.lora_rank == 16 and cfg.train.learning_rate == pytest.approx(3e-4)
    assert cfg.data.datasets() == ["a", "b"]
    with pytest.raises(TunepipeError, match="lora_rank"):
        load_config(path, ["lora_rank=abc"])
    with pytest.raises(TunepipeError, match="did you mean lora_rank"):
        load_config(path, ["train.lora_rnk=4"])
    with pytest.raises(TunepipeError, match="expected key=value"):
        load_config(path, ["lora_rank"])


def test_quantization_needs_lora(tmp_path):
    with pytest.raises(TunepipeError, match="quantization_bit"):
        load_config(write(tmp_path, "quantization_bit: 4\nfinetuning_type: full\n"))


def test_llamafactory_streaming_keys_map_to_the_streaming_data_stages(tmp_path):
    cfg = load_config(write(tmp_path, """\
        dataset: identity
        streaming: true
        buffer_size: 128
        max_steps: 10
        preprocessing_num_workers: 3
        preprocessing_batch_size: 64
        """))
    assert cfg.data.streaming and cfg.data.buffer_size == 128 and cfg.train.max_steps == 10
    assert cfg.data.preprocessing_num_workers == 3 and cfg.data.preprocessing_batch_size == 64
    with pytest.raises(TunepipeError, match="streaming=true needs train.max_steps"):
        load_config(write(tmp_path, "dataset: identity\nstreaming: true\n"))
