"""A local Kubernetes control plane for the demo and the e2e tests, built from Kubernetes' own
Go modules: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, and kwok simulating
GPU nodes and pod lifecycles (stages.yaml), plus kubectl and helm.

    build.py       what to compile and how (pure plan) + the runner     -> ensure_binaries()
    certs.py       CA and client/server certs (openssl CLI)
    components.py  every process' command line (pure)
    processes.py   start/stop by pid, port picking, /proc listeners
    cluster.py     up() / down() / status() on a state dir              -> ClusterInfo
    cli.py         `lmforge cluster up|down|status|build`

Nothing here imports the Kubernetes client: the cluster is driven with its own kubectl.
"""
