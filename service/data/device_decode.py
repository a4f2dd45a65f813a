"""On the tower's device: a host share -> its device batch (decode, crop, flip).

decode="device": the share holds JPEG bytes and `ImageParams` columns; this
tower decodes them in one batched call with NVIDIA nvImageCodec on its own
device, then scales, crops and flips there. nvImageCodec was chosen over
torchvision.io.decode_jpeg and DALI because it
- uses the GPUs' hardware JPEG engines (A100, H100/H200: NVJPG) through its
  HW_GPU_ONLY backend, falling back to its CUDA (nvJPEG) backend for images
  the engine does not take; torchvision's batched decode runs on the SMs;
- decodes on the CPU with the same API (its libjpeg-turbo backend, the same
  pixels as PIL), so decode="device" runs on a CPU-only cluster and in the
  tests here, where torchvision's image ops do not load beside CPU torch;
- installs as one wheel per CUDA major (nvidia-nvimgcodec-cu12 / -cu13) with
  no torch pin, beside any torch build; DALI is a whole pipeline framework
  (~1 GB wheel) whose own loaders we would not use.
Its GPU backends need the nvJPEG runtime (`nvidia-nvjpeg-cu12`, the `gpu`
extra and the CUDA image). Region-of-interest decode exists but would cut a
different crop per image in the engine's queue; decoding the whole
shorter-side-256 image and cropping on the device is simpler and exact.

decode="cpu": the share holds crops decoded by the read task; they are
copied to the device and flipped there.

The device batch: image uint8 [n, S, S, 3] (val: [n, crops, S, S, 3] with
crops > 1), label int64 [n], lighting float32 [n, 3].
"""

from __future__ import annotations

import os
import sys
import warnings
from collections import deque
from contextlib import contextmanager

import numpy as np
import torch
from torch.nn import functional as F

from service.data import transforms
from service.data.epochs import DataSource
from service.verbosity import verbose

Batch = dict[str, torch.Tensor]


@contextmanager
def _native_output_silenced():
    """nvImageCodec's native loader prints an error line for every optional codec
    library it cannot find (nvJPEG2000, nvTIFF; nvJPEG on a CPU machine) straight
    to file descriptors 1 and 2; none of them matters for JPEG decoding here.
    ALEXNET_RAY_VERBOSE=1 shows them."""
    if verbose():
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def nvimgcodec_decoder(device: torch.device, threads: int = 1):
    """An nvImageCodec decoder for `device`: every backend on a GPU (the hardware
    engine first, as nvImageCodec orders them), its CPU backend otherwise."""
    with _native_output_silenced():
        from nvidia import nvimgcodec

        if device.type == "cuda":
            return nvimgcodec.Decoder(device_id=device.index or 0, max_num_cpu_threads=threads)
        return nvimgcodec.Decoder(device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY, max_num_cpu_threads=threads,
                                  backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.CPU_ONLY)])


def scale_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [H, W, 3] -> [height, width, 3], antialiased bilinear (torch's match of PIL's filter)."""
    if image.shape[:2] == (height, width):
        return image
    chw = image.permute(2, 0, 1)[None].float()
    scaled = F.interpolate(chw, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return scaled[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)


def flip_rows(image: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror the rows of [n, H, W, 3] where `flip` is set.

    On a GPU: one `where` over the batch, no host read of `flip`. On the CPU,
    where `flip` is already on the host, row by row: torch's uint8 flip of a
    4-D batch along its width is slow (~0.28 ms per 224² image, one thread),
    a row's [H, W, 3] flip copied into the output ~0.04 ms with the unflipped
    rows' copies included.
    """
    if image.device.type != "cpu":
        return torch.where(flip.view(-1, 1, 1, 1), image.flip(2), image)
    out = torch.empty_like(image)
    for row, mirrored in enumerate(flip.tolist()):
        out[row].copy_(image[row].flip(1) if mirrored else image[row])
    return out


def _host_tensor(array) -> torch.Tensor:
    """A tensor over a host array without a copy (Ray's object-store arrays are read-only;
    nothing here writes to them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        return torch.as_tensor(array)


def _to_device(array, device: torch.device) -> torch.Tensor:
    tensor = _host_tensor(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


class ShareLoader:
    """Turns this tower's host shares into device batches (see the module docstring)."""

    def __init__(self, source: DataSource, device: torch.device, threads: int = 1):
        self.source, self.device = source, device
        self._decoder = nvimgcodec_decoder(device, threads) if source.decode == "device" else None
        self._warned_host_decode = False
        # CUDA: decoded images (nvImageCodec's memory, viewed without a copy) stay
        # referenced until the crops copied out of them have run on the stream.
        self._in_flight: deque = deque()

    @classmethod
    def for_decoded(cls, device: torch.device) -> "ShareLoader":
        """A loader of decode="cpu" shares (decoded crops) that needs no dataset (benchmarks, checks)."""
        loader = cls.__new__(cls)
        loader.source, loader.device, loader._decoder = None, device, None
        return loader

    def __call__(self, share: dict, split: str) -> Batch:
        label = _to_device(np.asarray(share["label"], np.int64), self.device)
        lighting = _to_device(np.asarray(share["lighting"], np.float32), self.device)
        if self._decoder is None:
            image = _to_device(share["image"], self.device)
        else:
            image = self._decode(share, split)
        if split == "train":
            image = flip_rows(image, _to_device(np.asarray(share["flip"], bool), self.device))
        return {"image": image, "label": label, "lighting": lighting}

    def _decode(self, share: dict, split: str) -> torch.Tensor:
        source, size, device = self.source, self.source.image_size, self.device
        jpegs = list(share["jpeg"])
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        while self._in_flight and self._in_flight[0][0].query():
            self._in_flight.popleft()
        with _native_output_silenced():
            decoded = self._decoder.decode(jpegs, cuda_stream=stream)
        resize, box = np.asarray(share["resize"]), np.asarray(share["box"])
        rows = []
        for row, image in enumerate(decoded):
            if image is None:
                raise ValueError(f"row {row} of this share is not a JPEG nvImageCodec can decode "
                                 f"({len(jpegs[row])} bytes); re-ingest the dataset")
            scaled = scale_image(self._tensor(image), int(resize[row, 0]), int(resize[row, 1]))
            top, left, height, width = (int(v) for v in box[row])
            cut = scaled[top:top + height, left:left + width]
            if split != "train":
                rows.append(eval_crops(cut, size, source.eval_crops, source.hflip))
            elif source.augmentation == "paper":
                rows.append(cut)  # a view: the stack below is its one copy
            else:
                rows.append(scale_image(cut, size, size))
        # One stack, not a copy per row: on a GPU torch copies many inputs per kernel launch,
        # so the tower's host work per image is not a launch per image.
        crops = () if split == "train" or source.eval_crop_count == 1 else (source.eval_crop_count,)
        out = torch.stack(rows) if rows else torch.empty((0, *crops, size, size, 3), dtype=torch.uint8, device=device)
        if device.type == "cuda":
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(device))
            self._in_flight.append((copied, decoded))
        return out

    def _tensor(self, image) -> torch.Tensor:
        """A decoded nvImageCodec image as a [H, W, 3] uint8 tensor on this device, without a copy
        where it already lies there."""
        if self.device.type != "cuda":
            return _host_tensor(np.asarray(image.cpu()))
        from nvidia import nvimgcodec  # imported (quietly) with the decoder

        if image.buffer_kind != nvimgcodec.ImageBufferKind.STRIDED_DEVICE:
            if not self._warned_host_decode:
                self._warned_host_decode = True
                print("[data] WARNING: nvImageCodec decoded on the CPU (no nvJPEG runtime?): install the "
                      "gpu extra (nvidia-nvjpeg-cu12) for the GPU decoders", file=sys.stderr, flush=True)
            return _host_tensor(np.asarray(image.cpu())).to(self.device, non_blocking=False)
        return torch.as_tensor(image, device=self.device)


def eval_crops(square: torch.Tensor, size: int, crops: int, mirrored: bool) -> torch.Tensor:
    """The centre size² crop of a square [s, s, 3], or its 10 (5 unmirrored) crops
    [crops, size, size, 3]: the geometry of `transforms.ten_crop_positions`."""
    side = square.shape[0]
    if crops == 1:
        top, left = transforms.center_crop_bounds(side, side, size)
        return square[top:top + size, left:left + size]
    cut = torch.stack([square[t:t + size, x:x + size] for t, x in transforms.ten_crop_positions(side, side, size)])
    return torch.cat([cut, cut.flip(2)]) if mirrored else cut
