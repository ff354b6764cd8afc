"Notebook-first research-to-production ML toolkit."
__version__ = "0.1.0"
