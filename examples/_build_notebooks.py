"""Write the example notebooks from the cell sources below (review this file, not the JSON).

    .venv/bin/python examples/_build_notebooks.py          # rewrite examples/*.ipynb
    .venv/bin/python examples/_build_notebooks.py --check  # exit 1 if a notebook is out of date

Every notebook starts with an "Open in Colab" badge and a cell that installs
colabkit. The tests (tests/test_examples.py) run each notebook top to bottom in a
real Jupyter kernel with ``COLABKIT_EXAMPLES_OFFLINE=1``: the install cell then
skips pip and calls ``examples/_offline.py``, which fakes the platform
(``colabkit.testing``) and swaps downloads (CIFAR-10, Fashion-MNIST, the
hymenoptera zip, pretrained weights) for small generated stand-ins. The code a
user sees and runs is the same in both cases; only the notebooks that train for
a long time read the same switch to shrink their epoch count, in one visible line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from textwrap import dedent

import nbformat
from nbformat import NotebookNode

HERE = Path(__file__).resolve().parent
REPO = "colabkit/colabkit"


def badge(name: str) -> str:
    url = f"https://colab.research.google.com/github/{REPO}/blob/main/examples/{name}.ipynb"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


def kaggle_badge(name: str) -> str:
    url = f"https://kaggle.com/kernels/welcome?src=https://github.com/{REPO}/blob/main/examples/{name}.ipynb"
    return f"[![Open In Kaggle](https://kaggle.com/static/images/open-in-kaggle.svg)]({url})"


def install_cell(platform: str, extras: str = "") -> str:
    packages = f"git+https://github.com/{REPO}" + (f" {extras}" if extras else "")
    return dedent(
        f"""\
        # Install colabkit from GitHub (the "colabkit" name on PyPI belongs to another project).
        import os
        if os.environ.get("COLABKIT_EXAMPLES_OFFLINE") == "1":  # the repository's tests: no network;
            import _offline; _offline.install("{platform}")  # small stand-ins replace the downloads
        else:
            !pip install -q {packages}"""
    )


def md(text: str) -> NotebookNode:
    return nbformat.v4.new_markdown_cell(dedent(text).strip())


def code(text: str) -> NotebookNode:
    return nbformat.v4.new_code_cell(dedent(text).strip())


def notebook(cells: list[NotebookNode], *, kaggle: bool = False) -> NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = cells
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        # Colab opens the notebook on a GPU runtime; Kaggle with two T4s and the internet on.
        "accelerator": "GPU",
        "colab": {"gpuType": "T4", "provenance": []},
    }
    if kaggle:
        nb.metadata["kaggle"] = {"accelerator": "nvidiaTeslaT4", "isInternetEnabled": True, "isGpuEnabled": True}
    # Stable cell ids keep the JSON diff-free between builds.
    for index, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{index:02d}"
    return nb


# -- quickstart -------------------------------------------------------------------------------------
def quickstart() -> NotebookNode:
    name = "quickstart"
    return notebook(
        [
            md(
                f"""
                # colabkit quickstart

                {badge(name)}

                Fine-tune a pretrained ResNet-18 to tell ants from bees (the PyTorch transfer-learning
                tutorial's data), with the dataset on fast local disk, checkpoints on Google Drive, and a
                resume that is just "run the cell again". Runtime > Change runtime type > **T4 GPU** first.
                """
            ),
            code(install_cell("colab")),
            code(
                """
                import colabkit, torch, torchvision
                from torchvision import datasets

                colabkit.info()  # runtime, GPU, RAM, disk, Drive
                """
            ),
            md(
                """
                `project_dirs` mounts Google Drive (Colab asks you to allow it once) and creates `models/`,
                `checkpoints/`, `results/` and `data/` for this project there. `stage` downloads the zip
                to the runtime's fast local disk, unpacks it and returns the folder; running the cell again
                reuses it (pass `sha256=` to have the download verified).
                """
            ),
            code(
                """
                dirs = colabkit.project_dirs("quickstart")
                data = colabkit.stage("https://download.pytorch.org/tutorial/hymenoptera_data.zip")
                weights = torchvision.models.ResNet18_Weights.DEFAULT
                train, val = (datasets.ImageFolder(data / split, weights.transforms()) for split in ("train", "val"))
                """
            ),
            md(
                """
                Train. `fit` picks the GPU and mixed precision, shows progress, and checkpoints to Drive
                after every epoch.
                """
            ),
            code(
                """
                model = torchvision.models.resnet18(weights=weights)
                model.fc = torch.nn.Linear(model.fc.in_features, len(train.classes))
                history = colabkit.fit(model, train, val, epochs=2, lr=1e-4, checkpoint_dir=dirs.checkpoints)
                """
            ),
            md(
                """
                **Resume.** If the runtime disconnects, run every cell again: `fit` finds the last checkpoint
                on Drive and continues from there (here the end of the last finished epoch; with
                `save_every=200` it also saves every 200 steps and resumes mid-epoch). `epochs` is the
                total, so calling `fit` again with the same `checkpoint_dir` and `epochs=3` trains one more
                epoch, then plots all three:
                """
            ),
            code(
                """
                history = colabkit.fit(model, train, val, epochs=3, lr=1e-4, checkpoint_dir=dirs.checkpoints)
                history.plot()
                """
            ),
        ]
    )


# -- CIFAR-10 ---------------------------------------------------------------------------------------
CIFAR_NOTE = """
    ### Settings for at least 90% test accuracy on a T4

    | setting | value |
    | --- | --- |
    | model | ResNet-18 adapted to 32x32 (3x3 stem, no max-pool), 11.2 M parameters |
    | augmentation | random crop 32 with 4-pixel padding, horizontal flip |
    | optimizer | SGD, momentum 0.9, Nesterov, lr 0.1, weight decay 5e-4 |
    | schedule | cosine annealing over the epochs, stepped per epoch |
    | epochs / batch | 30 epochs, batch 128 (391 steps per epoch) |
    | precision | `precision="auto"`: fp16 autocast with GradScaler on a T4; `channels_last=True` |

    **Expected accuracy: about 93% (at least 90%).** This is the standard ResNet-18 recipe for
    CIFAR-10; public reproductions of it report 93-95% test accuracy with 30 or more epochs.

    **Estimated time per epoch on a T4: about 30 s (range 20-45 s), so about 15 minutes for 30 epochs.**
    This is an estimate, not a measurement: colabkit's test machines have no GPU. Basis: the network
    does about 0.56 G multiply-adds (1.1 GFLOP) per 32x32 image forward and about three times that
    with the backward pass, so one epoch of 50,000 training images is about 170 TFLOP. Assuming the
    T4 sustains 6-8 TFLOP/s on it with fp16 tensor cores (roughly a tenth of its 65 TFLOP/s peak,
    usual for a small-image CNN), that is 21-28 s of compute, plus about 1 s to evaluate the 10,000
    test images. Colab's two CPU cores decode and augment very roughly 5,000 images/s with these
    PIL transforms, so loading (about 10 s per epoch) runs alongside the GPU work, but on a busy
    runtime it can become the limit. Measure yours with
    `colabkit.compare_devices(model, train_set, precision="auto")`.
"""


def cifar10_resnet() -> NotebookNode:
    name = "cifar10_resnet"
    return notebook(
        [
            md(
                f"""
                # CIFAR-10 with a ResNet-18: the full Colab workflow

                {badge(name)}

                torchvision's CIFAR-10 download, augmentation, a ResNet adapted to 32x32 images, mixed
                precision, gradient accumulation, checkpoints on Google Drive with resume, evaluation of the
                best checkpoint, inference on an image file, and export to ONNX.
                Runtime > Change runtime type > **T4 GPU** first.
                """
            ),
            code(install_cell("colab", "onnx onnxscript onnxruntime")),
            code(
                """
                import os
                from functools import partial
                import colabkit, torch, torchvision
                from torch import nn
                from torchvision import datasets, transforms

                colabkit.info()
                dirs = colabkit.project_dirs("cifar10-resnet")  # Drive: checkpoints/, models/, results/
                """
            ),
            md(CIFAR_NOTE),
            code(
                """
                EPOCHS = 30
                BATCH_SIZE = 128
                GRAD_ACCUM = 1  # e.g. BATCH_SIZE = 64 with GRAD_ACCUM = 2: same updates, half the memory
                LR = 0.1
                if os.environ.get("COLABKIT_EXAMPLES_OFFLINE") == "1":  # the repository's tests: a tiny CPU run
                    EPOCHS, BATCH_SIZE = 1, 32
                """
            ),
            md(
                """
                Data: downloaded to the runtime's fast local disk (`/content/data`), not to Drive.
                Random crops and flips for training; only normalisation for testing.
                """
            ),
            code(
                """
                data_dir = colabkit.runtime().data_dir / "cifar10"
                mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
                train_tf = transforms.Compose([
                    transforms.RandomCrop(32, padding=4),
                    transforms.RandomHorizontalFlip(),
                    transforms.ToTensor(),
                    transforms.Normalize(mean, std),
                ])
                test_tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
                train_set = datasets.CIFAR10(data_dir, train=True, download=True, transform=train_tf)
                test_set = datasets.CIFAR10(data_dir, train=False, download=True, transform=test_tf)
                len(train_set), len(test_set)
                """
            ),
            md(
                """
                ResNet-18 expects 224x224 images: its 7x7 stride-2 stem and max-pool would shrink a 32x32
                image to 8x8 before the first block. For CIFAR the stem becomes a 3x3 stride-1 convolution
                and the max-pool goes.
                """
            ),
            code(
                """
                def resnet18_cifar(num_classes: int = 10) -> nn.Module:
                    model = torchvision.models.resnet18(num_classes=num_classes)
                    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
                    model.maxpool = nn.Identity()
                    return model

                model = resnet18_cifar()
                """
            ),
            md(
                """
                Train. Checkpoints go to Drive every epoch (staged on local disk and copied in the
                background); the best one by validation accuracy is kept too. **If the runtime
                disconnects, run all cells again: `fit` resumes where it stopped.**
                """
            ),
            code(
                """
                history = colabkit.fit(
                    model, train_set, test_set,
                    epochs=EPOCHS, batch_size=BATCH_SIZE, grad_accum=GRAD_ACCUM,
                    optimizer=partial(torch.optim.SGD, momentum=0.9, nesterov=True, weight_decay=5e-4), lr=LR,
                    scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS),
                    precision="auto",  # fp16 + GradScaler on a T4, bf16 on newer GPUs, fp32 on a CPU
                    channels_last=True,
                    checkpoint_dir=dirs.checkpoints,
                    monitor="val_accuracy",
                )
                history.plot()
                """
            ),
            md("Evaluate the best checkpoint (highest validation accuracy), loaded for inference."),
            code(
                """
                best = colabkit.load_for_inference(dirs.checkpoints, resnet18_cifar(), monitor="val_accuracy")
                colabkit.evaluate(best, test_set, batch_size=256)
                """
            ),
            md("Inference on an image file, as you would on a photo you upload."),
            code(
                """
                image, label = datasets.CIFAR10(data_dir, train=False, download=True)[7]  # a PIL image
                path = dirs.results / "example.png"
                image.save(path)
                prediction = colabkit.predict_images(best, path, test_tf, train_set.classes, topk=3)
                print(prediction, "| true label:", train_set.classes[label])
                """
            ),
            md(
                """
                Export to ONNX for deployment; colabkit runs the exported file with onnxruntime and checks
                its outputs match PyTorch's.
                """
            ),
            code(
                """
                colabkit.export(best, torch.randn(1, 3, 32, 32), dirs.models / "resnet18_cifar10.onnx")
                """
            ),
        ]
    )


# -- Fashion-MNIST CPU vs GPU -----------------------------------------------------------------------
MAKE_CNN = """
    def make_cnn() -> nn.Module:
        \"\"\"A small AlexNet-style CNN for 28x28 grey images.\"\"\"
        return nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 14x14
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 7x7
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 256), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(256, 10),
        )
"""


DATA_NOTE = """
    Fashion-MNIST: 60,000 training and 10,000 test images of clothing, 28x28 grey, 10 classes.
    torchvision downloads it once per session to the runtime's fast local disk
    (`colabkit.runtime().data_dir`); only checkpoints need to outlive the session.
"""
LOAD_DATA = """
    data_dir = colabkit.runtime().data_dir / "fashion-mnist"
    to_tensor = transforms.ToTensor()
    train_set = datasets.FashionMNIST(data_dir, train=True, download=True, transform=to_tensor)
    test_set = datasets.FashionMNIST(data_dir, train=False, download=True, transform=to_tensor)
"""
MODEL_NOTE = """
    The model: two convolution + pooling blocks, then two linear layers with dropout
    (0.8 M parameters). A function builds it, so each experiment starts from fresh weights.
"""


def fashion_mnist_cpu_vs_gpu() -> NotebookNode:
    name = "fashion_mnist_cpu_vs_gpu"
    return notebook(
        [
            md(
                f"""
                # Fashion-MNIST: how much faster is the GPU?

                {badge(name)}

                The small AlexNet-style CNN of the Colab guides, timed on the CPU and on the GPU with
                `compare_devices` (warm-up and CUDA synchronisation done right), then trained on the faster
                one. Runtime > Change runtime type > **T4 GPU** first; without a GPU the notebook still runs
                and says so.
                """
            ),
            code(install_cell("colab")),
            code(
                """
                import os
                import colabkit, torch
                from torch import nn
                from torchvision import datasets, transforms

                EPOCHS = 1 if os.environ.get("COLABKIT_EXAMPLES_OFFLINE") == "1" else 10  # tests: one tiny epoch
                colabkit.info()
                """
            ),
            md(DATA_NOTE),
            code(LOAD_DATA),
            md(MODEL_NOTE),
            code(MAKE_CNN),
            md(
                """
                ## Time it on every device

                Training steps (forward, backward, optimizer step) and inference, on the CPU and each GPU,
                same model and batches, in float32 everywhere. The last column is the speed-up over the
                CPU. Pass `precision="auto"` to time the mixed precision `fit` uses on the GPU (fp16 on a
                T4), which is faster still.
                """
            ),
            code(
                """
                loader = torch.utils.data.DataLoader(train_set, batch_size=256, shuffle=True)
                timing = colabkit.compare_devices(make_cnn(), loader)
                print(timing)
                timing.plot()
                """
            ),
            md("Raw matrix-multiply speed, per device and precision (float16 uses the T4's tensor cores):"),
            code(
                """
                matmul = colabkit.matmul_speed()
                print(matmul)
                matmul.plot()
                """
            ),
            md("## Train on the fastest device"),
            code(
                """
                dirs = colabkit.project_dirs("fashion-mnist")
                model = make_cnn()
                history = colabkit.fit(model, train_set, test_set, epochs=EPOCHS, batch_size=256,
                                       checkpoint_dir=dirs.checkpoints)
                print(colabkit.evaluate(model, test_set, batch_size=512))
                history.plot()
                """
            ),
        ]
    )


# -- Kaggle, two GPUs -------------------------------------------------------------------------------
def kaggle_two_gpus() -> NotebookNode:
    name = "kaggle_two_gpus"
    return notebook(
        [
            md(
                f"""
                # Two GPUs on Kaggle with `colabkit.launch`

                {badge(name)} {kaggle_badge(name)}

                The Fashion-MNIST training, on both of Kaggle's T4s: `launch` starts one process per GPU
                (torch's own elastic launcher, as `torchrun` does), and inside them `fit` trains with
                DistributedDataParallel, each GPU on its half of every epoch. Only the first process saves
                checkpoints and shows progress; resume works as on one GPU.

                On Kaggle: Settings > Accelerator > **GPU T4 x2**, and Settings > **Internet on** (for the
                install). On a single GPU or a CPU the same cells train in one process.
                """
            ),
            code(install_cell("kaggle")),
            code(
                """
                import os
                import colabkit, torch
                from torch import nn
                from torchvision import datasets, transforms

                EPOCHS = 1 if os.environ.get("COLABKIT_EXAMPLES_OFFLINE") == "1" else 10  # tests: one tiny epoch
                colabkit.info()  # should list two Tesla T4
                dirs = colabkit.project_dirs("fashion-mnist-ddp")  # under /kaggle/working: kept as output
                """
            ),
            md(DATA_NOTE),
            code(LOAD_DATA),
            md(MODEL_NOTE),
            code(MAKE_CNN),
            md(
                """
                Everything that touches the GPU happens inside the function: `launch` forks the worker
                processes, and CUDA cannot be used before a fork. `batch_size` is per process, so two GPUs
                see 2 x 256 samples per step.
                """
            ),
            code(
                """
                def train():
                    model = make_cnn()
                    return colabkit.fit(model, train_set, test_set, epochs=EPOCHS, batch_size=256,
                                        checkpoint_dir=dirs.checkpoints)

                history = colabkit.launch(train, nprocs="auto")  # one process per visible GPU
                history.plot()
                """
            ),
            md("Evaluate the best checkpoint on one device:"),
            code(
                """
                model = colabkit.load_for_inference(dirs.checkpoints, make_cnn())
                colabkit.evaluate(model, test_set, batch_size=512)
                """
            ),
        ],
        kaggle=True,
    )


NOTEBOOKS = {
    "quickstart": quickstart,
    "cifar10_resnet": cifar10_resnet,
    "fashion_mnist_cpu_vs_gpu": fashion_mnist_cpu_vs_gpu,
    "kaggle_two_gpus": kaggle_two_gpus,
}


def render(name: str) -> str:
    nb = NOTEBOOKS[name]()
    nbformat.validate(nb)
    return nbformat.writes(nb) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write examples/*.ipynb from examples/_build_notebooks.py")
    parser.add_argument("--check", action="store_true", help="only report notebooks that differ")
    args = parser.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        path = HERE / f"{name}.ipynb"
        text = render(name)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date (run examples/_build_notebooks.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
