"""The training loop behind :func:`colabkit.fit`: resumable data order, precision, OOM back-off,
callbacks, history and multi-GPU launch.

Modules (each imports torch, so nothing here is imported by ``import colabkit``):

* :mod:`colabkit.train.loop`: ``fit``, ``evaluate``, ``predict``; ``_Trainer`` conducts the parts below.
* :mod:`colabkit.train.datapath`: the ``Batches`` protocol the loop reads, and the ordered choice of
  its implementation (in-memory paths first, the DataLoader last).
* :mod:`colabkit.train.runstate`: ``RunState``, where a run stands, saved and restored whole.
* :mod:`colabkit.train.cadence`: ``Cadence``, when to read the device, stop and save.
* :mod:`colabkit.train.reporter`: ``Reporter``, everything fit() says (table, bar, hints, finish, session).
* :mod:`colabkit.train.options`: ``FitOptions``, fit()'s arguments checked by their fields; durations.
* :mod:`colabkit.train.optim`: the optimizer and LR scheduler made from fit()'s arguments.
* :mod:`colabkit.train.batches`: the batch contract of every loop: data, (inputs, targets), calling
  the model, the default loss and batch size.
* :mod:`colabkit.train.resume`: finding, checking and restoring a checkpoint, and what a save
  writes (the only user of :mod:`colabkit.checkpoint` here).
* :mod:`colabkit.train.budget`: ``time_limit``'s bookkeeping of step, validation and save costs.
* :mod:`colabkit.train.lr_find`: the learning-rate range test, on fit()'s contract and optimizer.
* :mod:`colabkit.train.metrics`: metrics and the on-device running sums.
* :mod:`colabkit.train.progress`: the table of epochs that stays and the one live bar
  (through :mod:`colabkit.display`).
* :mod:`colabkit.train.hints`: the warning signs said once each with the fix, the host's wait
  for batches, and the finish against the session's end.
* :mod:`colabkit.train.state`: resumable sampler, per-sample worker seeding, position.
* :mod:`colabkit.train.fastpath`: in-memory tensors batched by indexing on the sampler's order
  (bitwise the DataLoader's batches), kept on the GPU when they fit.
* :mod:`colabkit.train.imagebatches`: in-memory image datasets the same way, their translated
  transform run on whole batches where the images live.
* :mod:`colabkit.train.precision`: the ``precision="auto"`` policy and GradScaler.
* :mod:`colabkit.train.oom`: micro-batch back-off on out-of-memory.
* :mod:`colabkit.train.callbacks`: ``Callback``, ``EarlyStopping``, ``CSVLogger``.
* :mod:`colabkit.train.history`: ``History``.
* :mod:`colabkit.train.distributed`: DDP under torchrun and ``launch()``.
"""
