"""Quantise activations to FP8 and normalise them with the TileLang kernels; check against the reference.

    python examples/quickstart.py          # needs a CUDA GPU (Hopper)
"""

import torch

import tilev4
from tilev4 import reference as R


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("this example launches kernels: it needs a CUDA GPU")
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(4096, device="cuda") + 0.5
    y = tilev4.rmsnorm(x, w)
    q, scale = tilev4.fp8_quantize(y)
    q_ref, scale_ref = R.fp8_e4m3_quantize(y.cpu(), 128)
    print("rmsnorm max |err| vs fp32 reference:", (y.float().cpu() - R.rmsnorm(x.cpu(), w.cpu())).abs().max().item())
    print("fp8 scales bit-exact:", torch.equal(scale.cpu(), scale_ref))
    print("fp8 values bit-exact:", torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8)))


if __name__ == "__main__":
    main()
