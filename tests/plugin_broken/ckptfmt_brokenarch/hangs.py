"""Never finishes importing, as one waiting on a network or a lock does."""

import threading

threading.Event().wait()
