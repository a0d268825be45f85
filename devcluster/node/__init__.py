"""The local process node: a small kubelet stand-in that runs the pods bound to it as local
processes (dev/test tool, not part of the operator image).

    node.py       the Node object, its heartbeat status and Lease (pure)
    podspec.py    pod spec -> ProcessSpec: argv, env, cwd, mount map, DNS rewrites (pure)
    podstatus.py  container states -> pod status (pure)
    volumes.py    emptyDir / configMap / secret / projected volumes as local directories
    probes.py     httpGet / tcpSocket / exec probes
    container.py  one container's process: start, restart policy, probes, stop
    kubelet.py    the kubelet API's /containerLogs over HTTPS (for `kubectl logs`)
    agent.py      the loop: register the node, watch its pods, run them, report status
    cli.py        `lmforge node run | logs | endpoints`
"""
