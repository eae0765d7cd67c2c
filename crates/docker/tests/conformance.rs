//! The driver conformance suite against the docker driver (real engine; each test prints
//! why it skips when the engine or the test image is missing: run `.ci/setup-docker.sh`).

use bulkhead_docker::{DockerDriver, Engine};
use bulkhead_driver::conformance::{DriverUnderTest, Fixture};
use bulkhead_driver::Driver;

/// The image every docker test runs: a busybox rootfs imported by `.ci/setup-docker.sh`.
const IMAGE: &str = "bulkhead-test/busybox:latest";

struct Docker {
    driver: DockerDriver,
    skip: Option<String>,
}

impl DriverUnderTest for Docker {
    fn driver(&self) -> &dyn Driver {
        &self.driver
    }

    fn fixture(&self) -> Fixture {
        let mut fx = Fixture::temp();
        fx.manifest_extra = format!("driver: docker\ndocker:\n  image: {IMAGE}\n");
        fx.bind_workdir = true;
        // The engine sets the container's host name.
        fx.env_extra = vec!["HOSTNAME".into()];
        fx
    }

    fn skip_reason(&self) -> Option<String> {
        self.skip.clone()
    }
}

async fn docker_driver() -> Docker {
    let engine = Engine::new(format!("conformance-{}", std::process::id()));
    let skip = match engine.ensure().await {
        Err(e) => Some(e.to_string()),
        Ok(client) => match client.inspect_image(IMAGE).await {
            Ok(_) => None,
            Err(e) => Some(format!(
                "test image {IMAGE} missing ({e}); run .ci/setup-docker.sh"
            )),
        },
    };
    Docker {
        driver: DockerDriver::new(engine, None),
        skip,
    }
}

bulkhead_driver::conformance_tests!(docker_driver);
