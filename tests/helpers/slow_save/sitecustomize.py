"""Test helper, put on PYTHONPATH: every checkpoint save of a selfaug process first sleeps SLOW_SAVE_S
seconds, so that a save outlasts a launcher's grace (30 s) as a large model's does."""
import importlib.abc
import importlib.machinery
import os
import sys
import time


class _SlowSave(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "selfaug.train.checkpoint":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            save = module.save

            def slow_save(*args, **kwargs):
                time.sleep(float(os.environ.get("SLOW_SAVE_S", "0")))
                return save(*args, **kwargs)
            module.save = slow_save
        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _SlowSave())
