"""E2 diffusion segmentation on ISIC 2016 with the published EnsemDiff settings (256 px, RGB).

  python -m diffseg_jax.main --config configs/e2_isic.py:ensemdiff --mode summary   # params: 113672065
  python -m diffseg_jax.main --config configs/e2_isic.py --workdir runs/e2_isic \
      --config.data.manual_dir=/path/to/ISIC2016                                     # needs the data issue

Model: guided-diffusion UNet as in JuliaWolleb/Diffusion-based-Segmentation (128 channels, channel_mult
(1,1,2,2,4,4), 2 res blocks, attention at downsample factor 16, one head), image concatenated to x_t.
Training: AdamW lr 1e-4 (wd 0), batch 10, EMA 0.9999, 60,000 steps, T = 1000 linear betas; sampling:
DDPM over all 1000 steps, an ensemble of 10 (the paper's ISIC size). The ISIC 2016 loader is not
registered yet, so training stops at start with a message naming the registered datasets.
"""

from ml_collections import config_dict

from configs import base


def get_config(arg=None):
    config = base.get_config(arg)
    config.experiment = "e2"
    config.data.name = "isic2016"
    config.data.image_size = 256
    config.data.manual_dir = config_dict.placeholder(str)
    if config.model.name == "ensemdiff" and not base.parse_arg(arg)[1]:
        config.model = base.ensemdiff_model(256)
    config.eval.ensemble_size = 10
    return config
