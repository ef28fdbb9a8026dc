"""Training: options (:mod:`~stevs.training.options`), batches and augmentation
(:mod:`~stevs.training.batches`), the loop (:mod:`~stevs.training.loop`: a prepared model and
datasets -> a model folder) and fold-level preparation above it (:mod:`~stevs.training.fold`:
frozen embeddings, context, linear path, refit). ``stevs train`` is :mod:`stevs.train`."""
