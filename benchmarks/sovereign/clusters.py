"""sovereign's template for the `clusters` discovery type in benchmarks/envoys.py: one STATIC cluster
per service instance of the source, its endpoints inline.

Inline rather than EDS: over REST each EDS cluster is a polling subscription of its own, so 1,000
EDS clusters would be 1,000 polls per Envoy per refresh (20,000 requests a second for 20 Envoys at
1 s), which no Python server answers; one CDS poll per Envoy carries the endpoints too.
sovereign loads this file by path (run with this directory as the working directory) and calls
`call` with the template context (`instances` is the source's list).
"""

from typing import Any


def call(instances: list[dict[str, Any]], **_: Any) -> list[dict[str, Any]]:
    return [
        {
            "name": i["name"],
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": i["name"],
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {"endpoint": {"address": {"socket_address": {"address": ip, "port_value": i["port"]}}}}
                            for ip in i["addresses"]
                        ]
                    }
                ],
            },
        }
        for i in instances
    ]
