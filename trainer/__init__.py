"""``pairforge train``: train a small CLIP-style model on a run's shards and
say in numbers whether the data teaches image-text alignment.

* :mod:`trainer.data`      webdataset streaming, the held-out split
* :mod:`trainer.model`     open_clip models, the CLIP loss, checkpoints
* :mod:`trainer.loop`      :class:`TrainConfig` and :func:`train`
* :mod:`trainer.evaluate`  recall@k vs chance, ROC AUC, Winoground-style scores
* :mod:`trainer.distributed`  the same loop under Ray Train (DDP) on GPUs
* :mod:`trainer.corpus`    the offline scorer's training corpus
* :mod:`trainer.scenes`    generated compositional scenes and Winoground-style pairs
* :mod:`trainer.cli`       ``main(argv)`` behind ``pairforge train``
* :mod:`trainer.labelled`  labelled image sets (ImageFolder, parquet, webdataset) for evaluation
* :mod:`trainer.zeroshot`  zero-shot accuracy with Wilson intervals, retrieval recall
* :mod:`trainer.eval_cli`  ``main(argv)`` behind ``pairforge eval``
"""
