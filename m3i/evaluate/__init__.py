"""``m3i evaluate``: kNN and linear probe on frozen features of held-out labelled images.

    result = evaluate(load_config("demo", overrides=["evaluate.model=runs/demo", "evaluate.out=runs/demo/eval"]))
    result.metrics["knn"]["top1"], result.metrics["probe"]["top1"]   # fractions in [0, 1]
    result.metrics["random_init"]["knn"]["top1"]                     # the same architecture at random init

Feature extraction runs where the module's weights are (``enc.module.to("cuda")`` for the GPU;
``evaluate`` moves them to ``evaluate.device``). The pieces work on their own too:

    enc = load_encoder(uri)                           # exported folder, checkpoint or run (local or s3://)
    index = read_split_index(shards_uri)
    train = extract_features(enc.module, index, "train", eval_transform(enc))
    test = extract_features(enc.module, index, "eval", eval_transform(enc))
    scores = score_features(train, test, index.classes, cfg.evaluate)      # kNN and probe on evaluate.device
    votes = knn_scores(train.features, train.labels, test.features, num_classes, k=20, temperature=0.07)
    logits = linear_probe(train.features, train.labels, test.features, num_classes)
    base = random_init(enc)                           # the architecture as training initialised it
    rows = find_history(enc)                          # history.jsonl of the run or export; [] when none
"""

from m3i.evaluate.curves import find_history, loss_series
from m3i.evaluate.features import (
    EvalView,
    Features,
    LabelledSplit,
    eval_transform,
    extract_features,
    labelled_count,
    read_split_index,
)
from m3i.evaluate.finetune import finetune
from m3i.evaluate.knn import knn_scores, topk_accuracy
from m3i.artifacts.export import read_exported_config
from m3i.evaluate.baseline import random_init
from m3i.evaluate.probe import linear_probe
from m3i.models.pretrained import Encoder, embed, load_encoder, load_exported
from m3i.evaluate.report import (
    EVAL_JOB,
    METRIC_NAMES,
    classification_metrics,
    kfp_scalars,
    push_metrics,
    render_figures,
    render_html,
    render_report,
    score_lines,
    write_outputs,
)
from m3i.evaluate.run import EvalResult, evaluate, feature_spread, score_features, score_random_init

__all__ = [
    "EVAL_JOB",
    "METRIC_NAMES",
    "Encoder",
    "EvalResult",
    "EvalView",
    "Features",
    "LabelledSplit",
    "classification_metrics",
    "embed",
    "eval_transform",
    "evaluate",
    "extract_features",
    "find_history",
    "feature_spread",
    "finetune",
    "kfp_scalars",
    "knn_scores",
    "labelled_count",
    "linear_probe",
    "load_encoder",
    "load_exported",
    "loss_series",
    "push_metrics",
    "random_init",
    "read_exported_config",
    "read_split_index",
    "render_figures",
    "render_html",
    "render_report",
    "score_features",
    "score_lines",
    "score_random_init",
    "topk_accuracy",
    "write_outputs",
]
