"""The training loop behind :func:`colabkit.fit`: resumable data order, precision, OOM back-off,
callbacks, history and multi-GPU launch.

Modules (each imports torch, so nothing here is imported by ``import colabkit``):

* :mod:`colabkit.train.loop`: ``fit``, ``evaluate``, ``predict`` and the step loop.
* :mod:`colabkit.train.options`: ``FitOptions``, fit()'s arguments checked by their fields; durations.
* :mod:`colabkit.train.optim`: the optimizer and LR scheduler made from fit()'s arguments.
* :mod:`colabkit.train.batches`: the batch contract of every loop: data, (inputs, targets), calling
  the model, the default loss and batch size.
* :mod:`colabkit.train.resume`: finding, checking and restoring a checkpoint, and what a save
  writes (the only user of :mod:`colabkit.checkpoint` here).
* :mod:`colabkit.train.budget`: ``time_limit``'s bookkeeping of step, validation and save costs.
* :mod:`colabkit.train.lr_find`: the learning-rate range test, on fit()'s contract and optimizer.
* :mod:`colabkit.train.metrics`: metrics and the on-device running sums.
* :mod:`colabkit.train.progress`: tqdm progress bars.
* :mod:`colabkit.train.state`: resumable sampler, per-sample worker seeding, position.
* :mod:`colabkit.train.precision`: the ``precision="auto"`` policy and GradScaler.
* :mod:`colabkit.train.oom`: micro-batch back-off on out-of-memory.
* :mod:`colabkit.train.callbacks`: ``Callback``, ``EarlyStopping``, ``CSVLogger``.
* :mod:`colabkit.train.history`: ``History``.
* :mod:`colabkit.train.distributed`: DDP under torchrun and ``launch()``.
"""
