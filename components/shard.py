"""``plan`` (where the shards go, what the cache keys on) and ``shard`` (raw images -> shards)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Output

from m3i.pipeline import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def plan(
    labelled: list,
    captions: list,
    unlabelled: list,
    eval_labelled: list,
    webdataset: list,
    eval_fraction: float,
    storage_uri: str,
    preset: str,
    overrides: list,
) -> NamedTuple("PlanOutputs", [("dataset_uri", str), ("cache_key", str)]):
    """Lists the raw inputs (never their bytes) and names the data set they shard into.

    ``cache_key`` equals the listing digest while that data set is complete in storage and
    changes when it is not, so a cached shard step whose objects are gone runs again.

    Args:
        labelled: Folders of class sub-folders (``<class>/<image>``), local or ``s3://``.
        captions: JSONL/CSV files of image,caption; their images are read relative to them.
        unlabelled: Folders of images without labels.
        eval_labelled: Folders of class sub-folders kept whole as the held-out split.
        webdataset: Existing WebDataset tars (brace patterns), local or ``s3://``; read where they are.
        eval_fraction: Fraction of each labelled class moved to the held-out split.
        storage_uri: Root of the pipeline's storage; the data set goes to ``datasets/<digest16>``.
        preset: m3i config preset.
        overrides: ``section.key=value`` config overrides.

    Returns:
        dataset_uri: Where the shards of these inputs go (content-addressed).
        cache_key: What the shard step is cached on.
    """
    import json
    from collections import namedtuple

    from m3i.pipeline.steps import plan_dataset

    sources = {
        "labelled": labelled, "captions": captions, "unlabelled": unlabelled, "eval_labelled": eval_labelled, "webdataset": webdataset
    }
    p = plan_dataset(sources, storage_uri, preset=preset, overrides=[*overrides, f"shard.eval_fraction={eval_fraction}"])
    print(json.dumps(p, indent=2))
    return namedtuple("PlanOutputs", ["dataset_uri", "cache_key"])(p["dataset_uri"], p["cache_key"])


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def shard(
    labelled: list,
    captions: list,
    unlabelled: list,
    eval_labelled: list,
    webdataset: list,
    eval_fraction: float,
    dataset_uri: str,
    cache_key: str,
    preset: str,
    overrides: list,
    dataset: Output[Dataset],
):
    """Shards the raw inputs into ``dataset_uri`` (WebDataset tars + index.json).

    Args:
        labelled: Folders of class sub-folders (``<class>/<image>``), local or ``s3://``.
        captions: JSONL/CSV files of image,caption; their images are read relative to them.
        unlabelled: Folders of images without labels.
        eval_labelled: Folders of class sub-folders kept whole as the held-out split.
        webdataset: Existing WebDataset tars (brace patterns), local or ``s3://``; read where they are.
        eval_fraction: Fraction of each labelled class moved to the held-out split.
        dataset_uri: Where the shards and index.json go (from plan).
        cache_key: Keys KFP's cache only (from plan).
        preset: m3i config preset.
        overrides: ``section.key=value`` config overrides.
        dataset: JSON manifest of the data set: URIs, counts per split and source, sha256 of the index.
    """
    import json

    from m3i.pipeline.steps import shard_dataset

    sources = {
        "labelled": labelled, "captions": captions, "unlabelled": unlabelled, "eval_labelled": eval_labelled, "webdataset": webdataset
    }
    m = shard_dataset(sources, dataset_uri, preset=preset, overrides=[*overrides, f"shard.eval_fraction={eval_fraction}"])
    m["cache_key"] = cache_key
    with open(dataset.path, "w") as f:
        json.dump(m, f, indent=2)
    dataset.metadata.update({k: m[k] for k in ("uri", "index", "index_sha256", "samples", "bad_inputs")})
    print(json.dumps(m, indent=2))
