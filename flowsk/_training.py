"""The one training loop every estimator uses."""
import copy
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from tqdm.auto import tqdm

_MAX_LR_CUTS = 3
_PLATEAU_LR_FACTOR = 10


def resolve_device(device):
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device, "
                         f"got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but CUDA is not available; "
                         "use device='cpu' or 'auto'")
    return device


def _finite(module):
    return all(torch.isfinite(p).all() for p in module.parameters())


def _split(n, validation_fraction, rng):
    order = rng.permutation(n)
    n_val = int(np.rint(n * validation_fraction))
    if n_val < 1 or n - n_val < 1:
        return order, order[:0]
    return order[n_val:], order[:n_val]


def train(module, loss_fn, data, *, max_epochs, batch_size, learning_rate, weight_decay=0.0,
          validation_fraction=0.1, n_iter_no_change=10, clip_norm=10.0, rng, verbose=0,
          desc="fit"):
    """Fit ``module`` by minimising ``loss_fn(module, batch) -> scalar`` with Adam.

    ``data``: tensor ``(n, ...)`` on the module's device (pairs can be concatenated along
    dimension 1 and split in ``loss_fn``); ``rng`` a NumPy ``RandomState``. A validation split
    (``validation_fraction``) drives early stopping: after ``n_iter_no_change`` epochs without
    improvement the best weights are restored and the learning rate divided by 10, after as many
    more training stops; the best weights are restored at the end.
    A non-finite loss, gradient or weight restores the best weights, resets the optimizer state
    and halves the learning rate; after three such cuts training stops with a
    :class:`ConvergenceWarning`.

    Returns ``(history, best_epoch)``; ``history`` holds ``train_loss`` and ``val_loss`` lists
    with one entry per epoch run (NaN for an epoch that diverged), so ``best_epoch`` indexes
    them.
    """
    train_idx, val_idx = _split(len(data), validation_fraction, rng)
    val = data[val_idx] if len(val_idx) else None
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=learning_rate, weight_decay=weight_decay)
    history = {"train_loss": [], "val_loss": []}
    best, best_epoch, stale, cuts, plateau_cut = np.inf, 0, 0, 0, False
    best_state = copy.deepcopy(module.state_dict())
    bar = tqdm(range(max_epochs), desc=desc, disable=verbose <= 0, leave=False)
    for epoch in bar:
        module.train()
        order = train_idx[rng.permutation(len(train_idx))]
        total, count, diverged = 0.0, 0, False
        for start in range(0, len(order), batch_size):
            batch = data[order[start:start + batch_size]]
            loss = loss_fn(module, batch)
            if not torch.isfinite(loss):
                diverged = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_norm)
            if not torch.isfinite(grad_norm):  # a step would make every weight NaN
                diverged = True
                break
            opt.step()
            total += loss.item() * len(batch)
            count += len(batch)
        if diverged or not _finite(module):
            cuts += 1
            history["train_loss"].append(float("nan"))
            history["val_loss"].append(float("nan"))
            module.load_state_dict(best_state)
            opt.state.clear()  # Adam's moments may be non-finite too
            if cuts > _MAX_LR_CUTS:
                warnings.warn(f"training diverged (non-finite loss or weights) at epoch {epoch}"
                              f"; stopped and kept the best weights (epoch {best_epoch}). "
                              "Try a lower learning_rate.", ConvergenceWarning,
                              stacklevel=4)  # train <- _fit / method.fit <- fit <- caller
                break
            for group in opt.param_groups:
                group["lr"] /= 2
            continue
        train_loss = total / count
        module.eval()
        if val is not None:
            with torch.no_grad():
                val_loss = loss_fn(module, val).item()
        else:
            val_loss = train_loss
        history["train_loss"].append(train_loss)
        history["val_loss"].append(val_loss)
        if verbose > 0:
            bar.set_postfix(train=f"{train_loss:.4g}", val=f"{val_loss:.4g}")
            if verbose > 1:
                tqdm.write(f"[{desc}] epoch {epoch}: train {train_loss:.5g}  val {val_loss:.5g}")
        if np.isfinite(val_loss) and val_loss < best:
            best, best_epoch, stale = val_loss, epoch, 0
            best_state = copy.deepcopy(module.state_dict())
        else:
            stale += 1
            if stale >= n_iter_no_change:
                if plateau_cut:
                    break
                plateau_cut, stale = True, 0
                module.load_state_dict(best_state)
                for group in opt.param_groups:
                    group["lr"] /= _PLATEAU_LR_FACTOR
    module.load_state_dict(best_state)
    module.eval()
    return history, best_epoch
