"""The ablation: does all-in-one beat each part? Equal steps and batch, several seeds, per-attribute kNN and probe.

From the repository root (``m3i ablate ...`` hands the same arguments to this module)::

    m3i demo-data --out m3i-data/abl/raw
    python -m experiments.ablation --preset demo --demo-root m3i-data/abl/raw --steps 300 --seeds 0 1 2 --curve-every 100 --jobs 2

Arms (``--variants``, default all of them; :mod:`experiments.ablation.arms`):

=========== ==================================================================================
m3i         all three branches at once on the mixed stream (labelled + captioned + unlabelled)
img         image->image alone, on the same mixed stream (every sample has an image)
cls         image->category alone, on the labelled source only
txt         image->text alone, on the captioned source only
two_stage   ``img`` on the mixed stream for the first half of the steps, then image->category and
            image->text on the labelled and captioned sources for the second half, started from the
            stage-1 backbone with ``train.init_from`` (fresh heads, optimiser and schedule)
=========== ==================================================================================

A single-branch arm reads only the source its branch learns from, so each of its batches is all
usable samples (the stronger baseline). Every arm and stage is one plain ``m3i train`` process
(``python -m m3i train --config <run config> --set ...``, no launcher: one rank), with
``--threads`` threads, ``--jobs`` arms at once. Each saves a checkpoint every ``--curve-every``
steps; every checkpoint's online backbone is scored, so each arm has a learning curve. Step 0 is
the backbone at random init, seeded as training seeds it (:func:`m3i.evaluate.random_init`), scored
once per seed: the same point starts every arm's curve.

Scores are per attribute of the demo scenes (``--attributes``, default shape, colour and
position; see :mod:`experiments.ablation.attributes`): labels say the shape, captions colour, size
and position, so each branch should help with a different attribute. The kNN memory bank and the
probe's training data are the labelled source's images, the held-out eval images are scored.

Layout under ``--workdir`` (:mod:`experiments.ablation.run`)::

    data/<demo>/train/               the training data set (all three sources), sharded from --demo-root
    data/<demo>/attributes/<attr>/   class folders of links by that attribute, and their shards
                                     (<demo>: the first 12 hex digits of attributes.jsonl's SHA-256)
    runs/<settings>/settings.json    what the settings hash names; config.yaml: the run config every arm gets
    runs/<settings>/<arm>-s<seed>/   one m3i train output (two_stage: .../stage1, .../stage2), train.log
    results.json                     {settings: [one entry per arm and seed, and per seed's random init]}

A re-run with the same settings skips every arm whose final checkpoints are complete and whose
results are in ``results.json``; an arm with complete checkpoints but no results is only scored, a
killed one resumes from its last checkpoint. The Markdown report (:mod:`experiments.ablation.report`,
verdict arithmetic in :mod:`experiments.ablation.stats`) keeps everything from its ``## Notes``
heading on, so hand-written commentary survives a re-run.
"""
