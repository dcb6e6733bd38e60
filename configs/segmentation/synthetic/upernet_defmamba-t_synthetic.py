# UperNet, DefMamba-T, a short run on the synthetic shapes set (see synthetic_ade.py).
_base_ = ['../upernet_defmamba-t_8xb2-160k_ade20k-512x512.py', './synthetic_ade.py']
globals().update(_base_.synthetic_ade)
