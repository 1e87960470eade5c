"""Image datasets held as one uint8 array: recognised, transformed in batches, or decoded once from a folder.

:class:`~colabkit.data.images.array.ImageArray` is the one in-memory image
dataset colabkit builds itself (from a user's array, or from a folder decoded
once); torchvision's in-memory datasets (MNIST, CIFAR10, ...) are recognised as
the same shape of data. Modules here load lazily and import torchvision and
PIL only where they are used.
"""
