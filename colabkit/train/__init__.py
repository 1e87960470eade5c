"""The training loop behind :func:`colabkit.fit`: resumable data order, precision, OOM back-off,
callbacks, history and multi-GPU launch.

Modules (each imports torch, so nothing here is imported by ``import colabkit``):

* :mod:`colabkit.train.loop`: ``fit``, ``evaluate``, ``predict`` and the step loop.
* :mod:`colabkit.train.options`: fit()'s argument checks, durations and ``time_limit``.
* :mod:`colabkit.train.optim`: the optimizer and LR scheduler made from fit()'s arguments.
* :mod:`colabkit.train.batches`: (inputs, targets) batches, calling the model, gathering outputs.
* :mod:`colabkit.train.metrics`: the default loss and its checks, metrics, on-device running sums.
* :mod:`colabkit.train.progress`: tqdm progress bars.
* :mod:`colabkit.train.state`: resumable sampler, per-sample worker seeding, position.
* :mod:`colabkit.train.precision`: the ``precision="auto"`` policy and GradScaler.
* :mod:`colabkit.train.oom`: micro-batch back-off on out-of-memory.
* :mod:`colabkit.train.callbacks`: ``Callback``, ``EarlyStopping``, ``CSVLogger``.
* :mod:`colabkit.train.history`: ``History``.
* :mod:`colabkit.train.distributed`: DDP under torchrun and ``launch()``.
"""
