"""Imported by each Ray worker process of a ``fedft simulate`` run as it starts (Ray's
``preload_python_modules``, set by ``simulations.ray_cluster.start_ray``): the worker loads
the run's base and data split before Flower makes it a client actor. Importing this module
anywhere else does nothing: ``warm_worker`` acts only in a Ray worker of such a run.
"""

from simulations.ray_cluster import warm_worker

warm_worker()
