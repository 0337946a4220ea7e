package medledger.bench.hapi;

import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.config.HapiJpaConfig;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import org.springframework.boot.SpringApplication;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.boot.autoconfigure.data.jpa.JpaRepositoriesAutoConfiguration;
import org.springframework.boot.autoconfigure.elasticsearch.ElasticsearchClientAutoConfiguration;
import org.springframework.boot.autoconfigure.elasticsearch.ElasticsearchRestClientAutoConfiguration;
import org.springframework.boot.autoconfigure.orm.jpa.HibernateJpaAutoConfiguration;
import org.springframework.context.annotation.Import;

/**
 * HAPI FHIR JPA server, FHIR R4 at /fhir, persisted with JPA (Hibernate) on PostgreSQL.
 *
 * <p>HAPI's own Spring configuration does the work: {@link JpaR4Config} (the R4 FhirContext,
 * one DAO and one resource provider per resource type, the system DAO that processes
 * transaction and batch Bundles), {@link HapiJpaConfig} (search, paging, the JPA services),
 * and the Batch2 job framework the JPA server needs, with HAPI's in-memory message broker
 * (as a single-node HAPI server has). {@link PersistenceConfig} gives it the
 * database and {@link FhirServerConfig} serves it over HTTP. Spring Boot's own JPA
 * auto-configuration is left out: HAPI brings its entity manager factory and repositories.
 *
 * <p>Started by bench/hapi_server.py with --server.port and --spring.datasource.url.
 */
@SpringBootApplication(
		exclude = {
			HibernateJpaAutoConfiguration.class,
			JpaRepositoriesAutoConfiguration.class,
			ElasticsearchClientAutoConfiguration.class,
			ElasticsearchRestClientAutoConfiguration.class
		})
@Import({
	JpaR4Config.class,
	HapiJpaConfig.class,
	JpaBatch2Config.class,
	Batch2JobsConfig.class,
	ThreadPoolFactoryConfig.class,
	SubscriptionChannelConfig.class
})
public class HapiBenchApplication {

	public static void main(String[] args) {
		SpringApplication.run(HapiBenchApplication.class, args);
	}
}
