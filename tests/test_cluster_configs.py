"""Paper-scale configs validate; the Ray cluster-launcher YAML passes Ray's own schema."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from qgscale import config
from qgscale.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["xor-tydi.yaml", "mkqa.yaml"])
def test_paper_scale_config(name, monkeypatch):
    for var in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"):  # load() exports storage settings
        monkeypatch.setenv(var, "")
    path = REPO / "configs" / name
    cfg = config.load(path)
    assert cfg.qg.model.name_or_path == "google/mt5-base"
    assert cfg.encoder.model.name_or_path == "xlm-roberta-base"
    assert cfg.run.root.startswith("s3://") and cfg.data.input.startswith("s3://")
    assert cfg.qg_rank.enabled and cfg.qg_rank.n_negatives <= cfg.mine.n_negatives
    for stage in (cfg.qg, cfg.qg_rank, cfg.warmup, cfg.distill):
        assert stage.use_gpu and stage.num_workers > 1
        assert stage.zero_stage == 2 and stage.precision == "bf16"
    assert cfg.teacher.score.precision == cfg.teacher.generate.precision == "bf16"
    assert cfg.index.encode.precision == cfg.index.search.precision == "bf16"
    # GPU stages say so: on a cluster without GPUs they fail instead of running on CPUs
    assert cfg.teacher.score.gpus_per_actor == cfg.teacher.generate.gpus_per_actor == 1
    assert cfg.index.encode.gpus_per_actor == cfg.index.build.gpus_per_actor == 1
    assert cfg.ray.address == "auto"
    assert cfg.distill.loss.alpha > 0 and cfg.distill.loss.beta > 0
    assert cfg.warmup.loss.alpha == 0 and cfg.warmup.loss.beta == 0
    assert cfg.eval.answer_recall and cfg.eval.chart_metric == "r@2kt"
    assert all(isinstance(x, str) for x in cfg.data.query_langs)  # YAML 'no' stays Norwegian
    assert "Resource needs" in path.read_text()
    with pytest.raises(ConfigError, match="distill.zero_stage"):
        config.load(path, ["distill.zero_stage=5"])


def test_cluster_launcher_yaml_valid():
    from ray.autoscaler._private.util import validate_config

    cfg = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    validate_config(cfg)
    workers = cfg["available_node_types"]["gpu_worker"]
    assert workers["max_workers"] > workers["min_workers"] == 0
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert "qgscale" in cfg["docker"]["image"]
    broken = copy.deepcopy(cfg)
    broken["available_node_types"]["gpu_worker"]["max_worker"] = 8  # typo
    with pytest.raises(Exception, match="max_worker"):
        validate_config(broken)


def test_dockerfile_builds_the_gpu_image():
    text = (REPO / "cluster" / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0].startswith("FROM nvidia/cuda:12")
    assert "faiss-gpu-cu12" in text and "pip uninstall -y faiss-cpu" in text
    assert any(ln.startswith("COPY qgscale") for ln in lines)
    assert "PATH=/opt/venv/bin:$PATH" in text  # ray start and job entrypoints use this Python
    # torch on the image's CUDA 12 line, not PyPI's default CUDA build, and checked
    index = next(ln for ln in lines if ln.startswith("ARG TORCH_INDEX="))
    assert index.endswith("/whl/cu128")
    assert '--index-url "$TORCH_INDEX" "$TORCH"' in text
    assert "torch.version.cuda.startswith('12.')" in text
