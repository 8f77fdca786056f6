"""One lock for the few operations that change process-wide state.

PyTorch numbers forward-mode AD levels process-wide, and
``warnings.catch_warnings`` swaps the module-level filter list. Two threads
doing either at once corrupt each other: a concurrent ``torch.func.jvp`` can
lose its tangents and silently return zeros, and interleaved
``catch_warnings`` blocks can leave the user's filters changed.
``SpectralSurgeonSearch(n_jobs>1)`` runs fits in threads, so every such
section in hessrebal holds this lock. It is reentrant because a solver's own
``catch_warnings`` runs inside the surgeon's.
"""

from __future__ import annotations

import threading

PROCESS_STATE_LOCK = threading.RLock()
