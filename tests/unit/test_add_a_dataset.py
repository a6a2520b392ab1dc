"""Adding a dataset already in the unified JSONL takes one YAML, as the README's "Adding a dataset"
says: ``conf/dataset/<name>.yaml`` with its name, folder and question; no ``kind`` (that names the
raw layout a data_prep converter reads; this dataset needs none). This test writes such a folder
and YAML (in a copy of ``conf/``), composes a run on it and reads its records and images.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hydra import compose, initialize_config_dir
from PIL import Image

from medloc.config import register_configs, to_run_config
from medloc.data.dataset import GroundingDataset

CONF = Path(__file__).resolve().parents[2] / "conf"

YAML = """\
# Chest X-rays already in the unified JSONL ({train,test}.jsonl + images under dir).
name: my_cxr
dir: {dir}
query: the nodule
min_pixels: 3136
max_pixels: 12544
"""


def test_a_jsonl_dataset_needs_one_yaml(tmp_path: Path) -> None:
    data = tmp_path / "my_cxr"
    (data / "images").mkdir(parents=True)
    Image.new("RGB", (64, 48), "grey").save(data / "images" / "a.png")
    for split in ("train", "test"):
        record = {"id": f"a-{split}", "image": "images/a.png", "height": 48, "width": 64,
                  "query": "the nodule", "box": [8.0, 6.0, 40.0, 30.0], "dataset": "my_cxr",
                  "split": split, "provenance": {}}
        (data / f"{split}.jsonl").write_text(json.dumps(record) + "\n")
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf, ignore=shutil.ignore_patterns("experiment"))
    (conf / "dataset" / "my_cxr.yaml").write_text(YAML.replace("{dir}", str(data)))

    register_configs()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = to_run_config(compose(config_name="config", overrides=["dataset=my_cxr"]))
    assert (cfg.dataset.name, cfg.dataset.kind, cfg.dataset.phantom) == ("my_cxr", None, None)
    sample = GroundingDataset(Path(cfg.dataset.dir) / f"{cfg.dataset.train_split}.jsonl")[0]
    assert sample.image.size == (64, 48) and sample.record.box == [8.0, 6.0, 40.0, 30.0]
