"""skyproto's twistd and endpoint plugins: objects only, the code lives in skyproto/."""

from skyproto.plugin import LazyServiceMaker
from skyproto.transports.loopback import LoopbackClientParser, LoopbackServerParser

skymaster = LazyServiceMaker(
    "skymaster", "skyproto master name service", "MasterOptions", "make_master_service"
)
skynode = LazyServiceMaker(
    "skynode", "skyproto node: services, harbor links, gate", "NodeOptions", "make_node_service"
)
skymapper = LazyServiceMaker(
    "skymapper", "skyproto epmd-compatible port mapper", "MapperOptions", "make_mapper_service"
)
loopback_server = LoopbackServerParser()
loopback_client = LoopbackClientParser()
